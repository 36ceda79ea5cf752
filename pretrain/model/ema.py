"""Multi-dimensional damped EMA (MEGA-style), the SSM that runs over every token.

Per channel c and state n (the SeqBoat paper, arXiv:2306.11197, after MEGA):
    h_t = p * beta * x_t + q * h_{t-1},   q = 1 - p * d
    y_t = (1/sqrt N) * sum_n eta * h_t + omega * x_t

Three ways to compute the same thing, all on sequence-major [L, B, C] inputs:
  * ``forward``         chunked convolution (training): within chunks of ``chunk`` tokens a
                        matmul with the kernel's Toeplitz matrix (an FFT above
                        MATMUL_CONV_MAX tokens), with the states carried between chunks, so
                        that the cost stays linear in L and no [C, N, L] tensor exists;
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
        return _contract_states(c * b, _powers(q, torch.arange(length, device=q.device)))

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        # float32 at least: bf16/fp16 lose the long tail of the kernel.
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @_exact
    def forward(self, x: Tensor) -> Tensor:
        """x: [L, B, C] -> y: [L, B, C] with zero initial state."""
        dtype = self.compute_dtype(x)
        xc = x.to(dtype)
        if self.truncation is None:
            y, _ = self._zero_state_scan(xc, final_state=False)
        else:
            kernel = self.kernel(min(self.truncation, x.shape[0]), dtype)
            y = fft_causal_conv(xc, kernel)
        return (y + self.omega.to(dtype) * xc).to(x.dtype)

    @_exact
    def scan_chunk(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exact EMA over a chunk that continues a sequence whose state before it is ``state``.

        x: [L, B, C]; state: [B, C, N] or None (zero). Returns (y [L, B, C], final state
        [B, C, N]). The untruncated recurrence, computed ``chunk`` tokens at a time.
        """
        dtype = self.compute_dtype(x)
        xc = x.to(dtype)
        y, final = self._zero_state_scan(xc, final_state=True)
        assert final is not None
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
        within = _powers(q, torch.arange(k, device=q.device))  # q^t inside a chunk
        starts = _powers(q, torch.arange(n, device=q.device) * k)  # q^(j k): chunk j's start
        # [C, n, B, N]: the state as it enters chunk j, weighted by eta/sqrt(N) * q.
        entering = state.transpose(0, 1).unsqueeze(1) * starts.transpose(1, 2).unsqueeze(2)
        weighted = entering * (c * q).unsqueeze(1).unsqueeze(1)
        return _from_chunk_rows(_respond(weighted, within), state.shape[0], 0, length)

    @_exact
    def chunk_decay(self, length: int, dtype: torch.dtype) -> Tensor:
        """q^length [C, N]: how much of a state survives ``length`` tokens."""
        q = self.coefficients(dtype)[1]
        return _powers(q, torch.tensor([length], device=q.device))[..., 0]

    def _chunking(self, length: int) -> tuple[int, int]:
        """(chunk length, number of chunks) for a sequence of ``length`` tokens."""
        k = self.chunk if 0 < self.chunk < length else length
        return k, -(-length // k)

    def _zero_state_scan(self, x: Tensor, final_state: bool) -> tuple[Tensor, Tensor | None]:
        """A convolution within each chunk (all chunks at once: ``_causal_conv_rows``), and
        each chunk's final state decayed into the chunks after it: linear in L. Returns (y
        without omega's skip, the final state [B, C, N] if ``final_state`` else None).

        The work runs channel-major, [C, chunks x B, k], so that every product is one batched
        matmul over contiguous rows; the sequence is zero-padded at the front to whole chunks
        (zero inputs into a zero state change nothing), so every chunk, the last included,
        is full."""
        length, batch, channels = x.shape
        k, n = self._chunking(length)
        pad = n * k - length
        b, q, c = self.coefficients(x.dtype)
        within = _powers(q, torch.arange(k, device=q.device))  # q^0 .. q^(k-1), [C, N, k]
        rows = _to_chunk_rows(x, k, pad)  # [C, n B, k]
        y = _causal_conv_rows(rows, _contract_states(c * b, within))
        if n == 1 and not final_state:
            return _from_chunk_rows(_contiguous_grad(y), batch, pad, length), None
        # Each chunk's own final state h = sum_s q^(k-1-s) p beta x_s: [C, n, B, N].
        own = torch.bmm(rows, within.flip(-1).transpose(1, 2)).view(channels, n, batch, -1) * (
            b.unsqueeze(1).unsqueeze(1)
        )
        decay = _powers(q, torch.tensor([k], device=q.device)).transpose(1, 2)  # q^k, [C, 1, N]
        # The state entering chunk j; unbind/stack keep the backward to one tensor each.
        owns = own.unbind(1)
        entering = [torch.zeros_like(owns[0])]
        for j in range(n - 1):
            entering.append(torch.addcmul(owns[j], entering[-1], decay))
        final = (
            torch.addcmul(owns[-1], entering[-1], decay).transpose(0, 1) if final_state else None
        )
        if n > 1:
            weighted = torch.stack(entering, 1) * (c * q).unsqueeze(1).unsqueeze(1)
            y = y + _respond(weighted, within)
        return _from_chunk_rows(_contiguous_grad(y), batch, pad, length), final

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
    rows = _to_chunk_rows(x, length, 0)
    return _from_chunk_rows(_fft_conv_rows(rows, kernel), x.shape[1], 0, length)


def _powers(q: Tensor, exponents: Tensor) -> Tensor:
    """q^e for every exponent: q [C, N], exponents [E] (integers) -> [C, N, E].

    Powers below the dtype's smallest normal number are flushed to exact zero, as a GPU in
    flush-to-zero mode would: on a CPU, subnormal floats make exp and every product that
    touches them 10-30x slower, and a 1024-step kernel with q ~ 0.75 is subnormal in float32
    past l ~ 300 (bench/RESULTS.md). The change is below 1.2e-38 absolute."""
    exponent = exponents.to(q.dtype).view(1, 1, -1) * torch.log(q).unsqueeze(-1)
    exponent = exponent.masked_fill(exponent < math.log(torch.finfo(q.dtype).tiny), -math.inf)
    return torch.exp(exponent)


def _contract_states(weights: Tensor, powers: Tensor) -> Tensor:
    """sum_n weights[c, n] * powers[c, n, l] -> [C, L], as one batched matmul."""
    return torch.bmm(weights.unsqueeze(1), powers).squeeze(1)


def _to_chunk_rows(x: Tensor, k: int, pad: int) -> Tensor:
    """[L, B, C] -> [C, n B, k], contiguous: ``pad`` zeros in front, then chunks of ``k``
    tokens, each chunk of each sequence one contiguous row of each channel.

    Always a copy: with B = 1 the permuted view has no unit stride, and every batched matmul
    that read it would copy it again, one channel at a time."""
    length, batch, channels = x.shape
    x = F.pad(x, (0, 0, 0, 0, pad, 0)) if pad else x
    n = (length + pad) // k
    if batch == 1:
        return _Transpose2d.apply(x.view(n * k, channels)).view(channels, n, k)
    rows = x.reshape(n, k, batch, channels).permute(3, 0, 2, 1)
    return rows.reshape(channels, n * batch, k).contiguous()


def _from_chunk_rows(rows: Tensor, batch: int, start: int, length: int) -> Tensor:
    """The inverse of ``_to_chunk_rows``: [C, n B, k] -> tokens start .. start + length of
    the [n k, B, C] sequence, contiguous."""
    channels, n_batch, k = rows.shape
    n = n_batch // batch
    if batch == 1:
        y = _Transpose2d.apply(rows.reshape(channels, n * k)).unsqueeze(1)
    else:
        y = rows.view(channels, n, batch, k).permute(1, 3, 2, 0).reshape(n * k, batch, channels)
    return y[start : start + length].contiguous()


class _Transpose2d(torch.autograd.Function):
    """``x.t().contiguous()`` of a 2-D tensor, forward and backward: PyTorch copies a 2-D
    transpose in cache-sized blocks, 2-3x faster on a CPU than the same copy in 3-D or 4-D
    (the [L, C] <-> [C, L] switch between the layer and the EMA's rows)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.t().contiguous()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.t().contiguous()


# Up to this chunk length the convolution inside a chunk is a matmul with the kernel's
# [k, k] Toeplitz matrix, above it an FFT: on a CPU at k = 32 the matmul's forward and
# backward take 0.2x the FFT's time (bench/RESULTS.md), and it is what tensor cores run best.
MATMUL_CONV_MAX = 128


def _causal_conv_rows(rows: Tensor, kernel: Tensor) -> Tensor:
    """Causal convolution of every row of channel c with kernel[c]: rows [C, R, k], kernel
    [C, K <= k] -> [C, R, k]."""
    k = rows.shape[-1]
    if k > MATMUL_CONV_MAX:
        return _fft_conv_rows(rows, kernel)
    # toeplitz[c, s, t] = kernel[c, t - s] for t >= s, else 0: the windows of the kernel
    # behind k - 1 zeros, the last window first (a view and one copy; its backward adds the
    # windows back without a scatter).
    padded = F.pad(kernel, (k - 1, k - kernel.shape[-1]))  # [C, 2k - 1]
    toeplitz = padded.unfold(1, k, 1).flip(1)
    return torch.bmm(rows, toeplitz)


def _contiguous_grad(rows: Tensor) -> Tensor:
    """``rows``, whose gradient is made contiguous when it arrives: it comes through
    _from_chunk_rows' permute, and one copy here spares each batched matmul that made
    ``rows`` a copy per channel in its backward."""
    if rows.requires_grad:
        rows.register_hook(torch.Tensor.contiguous)
    return rows


def _fft_conv_rows(rows: Tensor, kernel: Tensor) -> Tensor:
    """Causal convolution of every row of channel c with kernel[c]: rows [C, R, k], kernel
    [C, K <= k] -> [C, R, k]. Zero-padding to 2k makes the circular convolution linear."""
    k = rows.shape[-1]
    spectrum = torch.fft.rfft(rows, n=2 * k) * torch.fft.rfft(kernel, n=2 * k).unsqueeze(1)
    return torch.fft.irfft(spectrum, n=2 * k)[..., :k]


def _respond(entering: Tensor, within: Tensor) -> Tensor:
    """What the states entering the chunks add to each chunk's outputs: entering [C, n, B, N]
    (already weighted by eta/sqrt(N) * q), within [C, N, k] = q^t -> [C, n B, k]."""
    channels, n, batch, ndim = entering.shape
    return torch.bmm(entering.reshape(channels, n * batch, ndim), within)
