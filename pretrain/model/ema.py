"""Multi-dimensional damped EMA (MEGA-style), the SSM that runs over every token.

Per channel c and state n (the SeqBoat paper, arXiv:2306.11197, after MEGA):
    h_t = p * beta * x_t + q * h_{t-1},   q = 1 - p * d
    y_t = (1/sqrt N) * sum_n eta * h_t + omega * x_t

Three ways to compute the same thing, all on sequence-major [L, B, C] inputs:
  * ``forward``         FFT convolution (training): within chunks of ``chunk`` tokens, with the
                        states carried between chunks, so that the cost stays linear in L
                        (O(L log chunk) rather than O(L log L)) and no [C, N, L] tensor exists;
  * ``scan_chunk``      the same plus the contribution of a carried-in state, and the state
                        after the chunk (context parallelism passes states between ranks);
  * ``step``            the recurrence for one token (decoding).

All three run in float32 at least, also under autocast (bf16 training): a long kernel with
decay close to 1 is exactly where bf16 loses the tail. Autocast is switched off inside them
and the output is cast back to the input's dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel.layout import mark_tensor_parallel
from pretrain.model.init import initialize_, reset_, trunc_normal, trunc_normal_

Method = TypeVar("Method", bound=Callable)


def _exact(method: Method) -> Method:
    """``method`` with autocast off (its own dtypes hold: float32 at least)."""

    @functools.wraps(method)
    def run(self: DampedEMA, *args: object, **kwargs: object) -> object:
        with torch.autocast(self.omega.device.type, enabled=False):
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


@torch.no_grad()
def _init_beta(beta: Tensor, generator: torch.Generator | None) -> None:
    """TN(0, 0.02) around +1 on even and -1 on odd state dimensions."""
    trunc_normal_(beta, std=0.02, generator=generator)
    sign = torch.ones(beta.shape[-1], dtype=beta.dtype, device=beta.device)
    sign[1::2] = -1.0
    beta.add_(sign)


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
        initialize_(self.delta, trunc_normal(0.2))
        initialize_(self.alpha, trunc_normal(0.2))
        initialize_(self.beta, _init_beta)
        initialize_(self.eta, trunc_normal(1.0))
        initialize_(self.omega, trunc_normal(1.0))

    def reset_parameters(self) -> None:
        reset_(self)

    def coefficients(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (input scale p*beta, decay q, output weights eta/sqrt N), each [C, N]."""
        p = torch.sigmoid(self.delta.to(dtype))
        q = 1.0 - p * torch.sigmoid(self.alpha.to(dtype))
        return p * self.beta.to(dtype), q, self.eta.to(dtype) / math.sqrt(self.ndim)

    @_exact
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

    @_exact
    def forward(self, x: Tensor) -> Tensor:
        """x: [L, B, C] -> y: [L, B, C] with zero initial state."""
        if self.truncation is None:
            return self.scan_chunk(x)[0]
        length = x.shape[0]
        dtype = self.compute_dtype(x)
        kernel = self.kernel(min(self.truncation, length), dtype)
        y = fft_causal_conv(x.to(dtype), kernel)
        return (y + self.omega.to(dtype) * x.to(dtype)).to(x.dtype)

    @_exact
    def scan_chunk(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exact EMA over a chunk that continues a sequence whose state before it is ``state``.

        x: [L, B, C]; state: [B, C, N] or None (zero). Returns (y [L, B, C], final state
        [B, C, N]). The untruncated recurrence, computed ``chunk`` tokens at a time.
        """
        dtype = self.compute_dtype(x)
        xc = x.to(dtype)
        y, final = self._zero_state_scan(xc)
        if state is not None:
            state = state.to(dtype)
            y = y + self.state_response(state, x.shape[0])
            final = final + state * self.chunk_decay(x.shape[0], dtype)
        return (y + self.omega.to(dtype) * xc).to(x.dtype), final

    @_exact
    def state_response(self, state: Tensor, length: int) -> Tensor:
        """What a state carried into a sequence adds to its first ``length`` outputs:
        sum_n eta/sqrt(N) * q^(t+1) * state; [length, B, C] (omega's skip not included)."""
        k, n = self._chunking(length)
        _, q, c = self.coefficients(state.dtype)
        powers = self._powers(q, k + 1, state.dtype, start=0)
        carried = [state]  # the state entering chunk j is state * q^(j k)
        for _ in range(n - 1):
            carried.append(carried[-1] * powers[..., k])
        y = torch.einsum("jbcn,cnk->jkbc", torch.stack(carried) * c, powers[..., 1:])
        return y.reshape(n * k, *state.shape[:2])[:length]

    @_exact
    def chunk_decay(self, length: int, dtype: torch.dtype) -> Tensor:
        """q^length [C, N]: how much of a state survives ``length`` tokens."""
        return self._powers(self.coefficients(dtype)[1], 1, dtype, start=length)[..., 0]

    def _chunking(self, length: int) -> tuple[int, int]:
        """(chunk length, number of chunks) for a sequence of ``length`` tokens."""
        k = self.chunk if 0 < self.chunk < length else length
        return k, -(-length // k)

    def _zero_state_scan(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """An FFT convolution within each chunk (all chunks at once), and each chunk's final
        state decayed into the chunks after it: linear in L. Returns (y without omega's
        skip, final state)."""
        length, batch, channels = x.shape
        k, n = self._chunking(length)
        xs = F.pad(x, (0, 0, 0, 0, 0, n * k - length)).view(n, k, batch, channels)
        b, q, c = self.coefficients(x.dtype)
        powers = self._powers(q, k + 1, x.dtype, start=0)  # q^0 .. q^k, [C, N, k+1]
        kernel = torch.einsum("cn,cnl->cl", c * b, powers[..., :k])
        inner = fft_causal_conv(xs.transpose(0, 1).reshape(k, n * batch, channels), kernel)
        y = inner.view(k, n, batch, channels).transpose(0, 1)
        # Each chunk's own final state: h = sum_s q^(k-1-s) p beta x_s.
        own = torch.einsum("jkbc,cnk->jbcn", xs, powers[..., :k].flip(-1)) * b
        carried = [torch.zeros_like(own[0])]
        for j in range(n - 1):
            carried.append(carried[-1] * powers[..., k] + own[j])
        # The state carried into a chunk reaches its output t decayed by q^(t+1).
        y = y + torch.einsum("jbcn,cnk->jkbc", torch.stack(carried) * c, powers[..., 1:])
        # The last chunk may be padded: its final state counts only its r real tokens.
        r = length - (n - 1) * k
        last = torch.einsum("kbc,cnk->bcn", xs[-1, :r], powers[..., :r].flip(-1)) * b
        final = carried[-1] * powers[..., r] + last
        return y.reshape(n * k, batch, channels)[:length], final

    @_exact
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
