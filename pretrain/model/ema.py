"""Multi-dimensional damped EMA (MEGA-style), the SSM that runs over every token.

Per channel c and state n (SEQBOAT.md §4):
    h_t = p * beta * x_t + q * h_{t-1},   q = 1 - p * d
    y_t = (1/sqrt N) * sum_n eta * h_t + omega * x_t

Three ways to compute the same thing, all on sequence-major [L, B, C] inputs:
  * ``forward``         FFT convolution with the unrolled kernel (training); past ``chunk``
                        tokens, FFT convolutions within chunks plus states carried between
                        them, so the cost stays linear in L (O(L log chunk), not O(L log L));
  * ``scan_chunk``      the convolution plus the contribution of a carried-in state, and the
                        state after the chunk (sequence parallelism passes states between ranks);
  * ``step``            the recurrence for one token (decoding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.layout import mark_tensor_parallel
from pretrain.model.init import trunc_normal_


class DampedEMA(nn.Module):
    def __init__(
        self, channels: int, ndim: int = 16, truncation: int | None = None, chunk: int = 0
    ) -> None:
        super().__init__()
        self.channels = channels
        self.ndim = ndim
        self.truncation = truncation
        self.chunk = chunk  # 0: one FFT over the whole sequence
        # Names follow the reference code: sigmoid(delta) is the input weight p, sigmoid(alpha)
        # the damping d (the MEGA paper swaps the two names).
        self.delta = nn.Parameter(torch.empty(channels, ndim))
        self.alpha = nn.Parameter(torch.empty(channels, ndim))
        self.beta = nn.Parameter(torch.empty(channels, ndim))
        self.eta = nn.Parameter(torch.empty(channels, ndim))
        self.omega = nn.Parameter(torch.empty(channels))
        # Depthwise: every parameter splits by channel under tensor parallelism, no communication.
        for p in self.parameters():
            mark_tensor_parallel(p, dim=0)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        trunc_normal_(self.delta, std=0.2)
        trunc_normal_(self.alpha, std=0.2)
        trunc_normal_(self.beta, std=0.02)
        sign = torch.ones(self.ndim)
        sign[1::2] = -1.0
        self.beta.add_(sign)
        trunc_normal_(self.eta, std=1.0)
        trunc_normal_(self.omega, std=1.0)

    def coefficients(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (input scale p*beta, decay q, output weights eta/sqrt N), each [C, N]."""
        p = torch.sigmoid(self.delta.to(dtype))
        q = 1.0 - p * torch.sigmoid(self.alpha.to(dtype))
        return p * self.beta.to(dtype), q, self.eta.to(dtype) / math.sqrt(self.ndim)

    def kernel(self, length: int, dtype: torch.dtype) -> Tensor:
        """K[c, l] = sum_n eta/sqrt(N) * p * beta * q^l  for l < length; [C, length]."""
        b, q, c = self.coefficients(dtype)
        powers = self._powers(q, length, dtype, start=0)  # [C, N, length]
        return torch.einsum("cn,cnl->cl", c * b, powers)

    @staticmethod
    def _powers(q: Tensor, length: int, dtype: torch.dtype, start: int) -> Tensor:
        ell = torch.arange(start, start + length, device=q.device, dtype=dtype)
        return torch.exp(ell.view(1, 1, -1) * torch.log(q).unsqueeze(-1))

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        # The FFT runs in float32 at least (bf16/fp16 FFTs lose the long tail of the kernel).
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def forward(self, x: Tensor) -> Tensor:
        """x: [L, B, C] -> y: [L, B, C] with zero initial state."""
        length = x.shape[0]
        dtype = self.compute_dtype(x)
        if self.truncation is None and 0 < self.chunk < length:
            y = self._chunked_conv(x.to(dtype))
        else:
            klen = length if self.truncation is None else min(self.truncation, length)
            y = fft_causal_conv(x.to(dtype), self.kernel(klen, dtype))
        return (y + self.omega.to(dtype) * x.to(dtype)).to(x.dtype)

    def _chunked_conv(self, x: Tensor) -> Tensor:
        """The untruncated convolution, chunk by chunk: an FFT within each chunk (all chunks
        at once), and each chunk's final state decayed into the chunks after it."""
        length, batch, channels = x.shape
        k = self.chunk
        n = -(-length // k)
        xs = F.pad(x, (0, 0, 0, 0, 0, n * k - length)).view(n, k, batch, channels)
        b, q, c = self.coefficients(x.dtype)
        powers = self._powers(q, k + 1, x.dtype, start=0)  # q^0 .. q^k, [C, N, k+1]
        kernel = torch.einsum("cn,cnl->cl", c * b, powers[..., :k])
        inner = fft_causal_conv(xs.transpose(0, 1).reshape(k, n * batch, channels), kernel)
        y = inner.view(k, n, batch, channels).transpose(0, 1)
        # Each chunk's own final state, then the states carried into every chunk.
        own = torch.einsum("jkbc,cnk->jbcn", xs, powers[..., :k].flip(-1)) * b
        carried = [torch.zeros_like(own[0])]
        for j in range(n - 1):
            carried.append(carried[-1] * powers[..., k] + own[j])
        # The state carried into a chunk reaches its output t decayed by q^{t+1}.
        y = y + torch.einsum("jbcn,cnk->jkbc", torch.stack(carried) * c, powers[..., 1:])
        return y.reshape(n * k, batch, channels)[:length]

    def scan_chunk(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exact EMA over a chunk that continues a sequence whose state before it is ``state``.

        x: [L, B, C]; state: [B, C, N] or None (zero). Returns (y [L, B, C], final state
        [B, C, N]). Truncation is not applied: the chunk scan is the untruncated recurrence.
        """
        length = x.shape[0]
        dtype = self.compute_dtype(x)
        xc = x.to(dtype)
        b, q, c = self.coefficients(dtype)
        powers = self._powers(q, length + 1, dtype, start=0)  # q^0 .. q^L, [C, N, L+1]
        y = fft_causal_conv(xc, torch.einsum("cn,cnl->cl", c * b, powers[..., :length]))
        # Final state: h_{L-1} = sum_s q^{L-1-s} * p*beta * x_s  (+ q^L * state).
        final = torch.einsum("lbc,cnl->bcn", xc, powers[..., :length].flip(-1)) * b
        if state is not None:
            state = state.to(dtype)
            # The carried state reaches output t decayed by q^{t+1}.
            y = y + torch.einsum("bcn,cnl->lbc", state * c, powers[..., 1:])
            final = final + state * powers[..., length]
        y = y + self.omega.to(dtype) * xc
        return y.to(x.dtype), final

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One token. x: [B, C]; state: [B, C, N]. Returns (y [B, C], new state)."""
        dtype = self.compute_dtype(x)
        b, q, c = self.coefficients(dtype)
        state = b * x.to(dtype).unsqueeze(-1) + q * state.to(dtype)
        y = (state * c).sum(-1) + self.omega.to(dtype) * x.to(dtype)
        return y.to(x.dtype), state

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch, self.channels, self.ndim, device=device, dtype=dtype)


def fft_causal_conv(x: Tensor, kernel: Tensor) -> Tensor:
    """Linear (non-circular) causal convolution y_t = sum_{l<K} kernel[:, l] * x_{t-l}.

    x: [L, B, C]; kernel: [C, K] with K <= L. Returns [L, B, C].
    """
    length = x.shape[0]
    n = 2 * length  # zero-padding to 2L makes the circular convolution linear
    xf = torch.fft.rfft(x.permute(1, 2, 0), n=n)  # [B, C, n/2+1]
    kf = torch.fft.rfft(F.pad(kernel, (0, length - kernel.shape[-1])), n=n)  # [C, n/2+1]
    y = torch.fft.irfft(xf * kf, n=n)[..., :length]
    return y.permute(2, 0, 1)
