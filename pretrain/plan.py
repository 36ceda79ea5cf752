"""``seqboat plan``: will a layout fit in memory? Per-rank memory before submitting a job.

For a config and a cluster (nodes x GPUs, memory per GPU) it estimates, per rank, the bytes
of the weights, gradients, optimizer state (by ZeRO stage), activations and communication
buffers of a layout (tensor x context x pipeline x data parallel x ZeRO stage x recompute),
and ranks every layout of the cluster that fits, with the reason each other one does not.

Parameters are counted exactly: the model is built on the meta device and each parameter's
tensor-parallel split (``parallel.layout``) and pipeline stage are read off it.

Activations follow SeqBoat's own structure (``pretrain/model/layer.py``): per layer and
micro-batch, the tensors autograd saves for backward (read off the graph with
``saved_tensors_hooks``, each storage once, parameters left out), with T = (L / cp) x
micro-batch tokens on a rank, S = T (/ tp under sequence parallelism) residual tokens,
C = D / tp EMA channels, H / tp GAU value channels, and M the compressed tokens:

* the residual stream: the norm's input and the output silu's input (2 S D);
* every token, channel-split: the EMA's input, its output, the projection's input (3 T C),
  and the gated GAU output (T D, ``routing=sparse``);
* inside the EMA (fp32, fp64 in fp64 runs), chunks of k = ``model.ema_chunk`` tokens: the
  input as chunk rows (T C), the [C, N, k] powers (twice), the states entering the chunks
  (3 x T C N / k) and the convolution's [C, k, k] Toeplitz matrix (k <= 128; above it the
  rows' spectra, ~2 T C);
* the GAU on the M activated tokens: its input (M D), 4 Z (+ 2 Z for RoPE's cos/sin) and
  6 H / tp per token (r's and v's silu inputs, the attention output and r, their product,
  the values, which the windows of b = ``model.attention_block`` queries view), and the
  attention's own [b, w + b] block per window (w + b per token): on a CPU the math path's
  probabilities, on a GPU the additive mask the memory-efficient kernel is given (plus its
  logsumexp, one float per query); on the path that builds score blocks (relu2, learned
  positional biases, attention dropout), two.
  M = ratio x L / cp (+ the halo of w tokens under context parallelism), where ``ratio``
  is the fraction of tokens activated in the most activated sequence of a micro-batch.
  It is an input: 1.0 by default (every token; the upper bound, and the routing of a
  ``model.routing=always`` model); a trained SeqBoat model activates far fewer;
* dropout masks (one byte per element) where dropout is on, and the FFN if there is one.

The peak is at the start of the last micro-batch's backward, or inside a layer's backward:
every held layer's kept tensors plus the larger of two transients that never coexist (the
layers' saved tensors are freed as their backward runs): the loss's (logits, log-softmax
and their gradients) and a layer's backward (what its recompute made again: ``gau`` the
GAU's part, ``layer`` the whole layer; plus the gradient of its value windows,
(w + b) / b x M H / tp).
Gradients of earlier micro-batches, weights and optimizer state are held throughout.
Buffers written only during the backward (parallel/grads.py's overlapped reduction; on a
CPU DeepSpeed's bucket, whose fresh pages become resident only as gradients are copied
in) fill as activations are freed, so they compete with the activations through the
maximum; on a GPU DeepSpeed's bucket is allocated whole before the backward. Under 1F1B
the first pipeline stage holds ``pipeline`` micro-batches of its layers (interleaved:
``1 + (pp - 1) / (pp x vp)`` times the model's layers), the last stage the logits and loss.
tests/test_plan.py checks the estimate against the measured peak of seven CPU runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from pretrain.config import Config, ConfigError, micro_batches_per_step, validate

RECOMPUTE_MODES = ("none", "gau", "layer")
# Bytes that are not the model's: allocator slack, kernel workspaces, collectives' scratch.
SLACK = 0.05

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '81920MiB', '80G' (binary), '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"memory {text!r} does not parse (e.g. 80GiB, 80GB, 81920MiB)")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"memory {text!r} must be positive")
    return int(value)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    recompute: str = "none"
    sp: bool = False  # sequence parallelism (tensor > 1)
    vp: int = 1  # virtual pipeline stages

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def name(self) -> str:
        sp = "+sp" if self.sp else ""
        vp = f"x{self.vp}v" if self.vp > 1 else ""
        return (
            f"tp{self.tp}{sp} cp{self.cp} pp{self.pp}{vp} dp{self.dp} zero{self.zero} "
            f"{self.recompute}"
        )

    def apply(self, cfg: Config) -> Config:
        """``cfg`` run with this layout."""
        parallel = replace(
            cfg.parallel, tensor=self.tp, context=self.cp, pipeline=self.pp,
            sequence_parallel=self.sp, virtual_stages=self.vp,
            stage_layers=cfg.parallel.stage_layers if self.pp == cfg.parallel.pipeline else [],
            dispatch=cfg.parallel.dispatch if self.cp > 1 else "off",
        )  # fmt: skip
        optimizer = replace(cfg.optimizer, zero_stage=self.zero)
        train = replace(cfg.train, recompute=self.recompute, compile=False)
        return replace(cfg, parallel=parallel, optimizer=optimizer, train=train)


def layout_of(cfg: Config, world: int) -> Layout:
    p = cfg.parallel
    split = p.tensor * p.context * p.pipeline
    if world % split:
        raise ConfigError(
            f"{world} ranks are not a multiple of tensor x context x pipeline = {split}"
        )
    return Layout(
        p.tensor, p.context, p.pipeline, world // split, cfg.optimizer.zero_stage,
        cfg.train.recompute, p.sequence_parallel, p.virtual_stages,
    )  # fmt: skip


def parse_layout(text: str, cfg: Config, world: int) -> Layout:
    """'tp=2,cp=1,pp=4,zero=1,recompute=layer,sp=true,vp=1': the config's layout with these
    changes; data parallelism takes the rest of the world."""
    p = cfg.parallel
    values: dict[str, int | str | bool] = {
        "tp": p.tensor, "cp": p.context, "pp": p.pipeline, "zero": cfg.optimizer.zero_stage,
        "recompute": cfg.train.recompute, "sp": p.sequence_parallel, "vp": p.virtual_stages,
    }  # fmt: skip
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            raise ConfigError(
                f"layout {text!r}: {item!r} is not one of tp=, cp=, pp=, zero=, recompute=, "
                "sp=, vp="
            )
        if key == "recompute":
            if value not in RECOMPUTE_MODES:
                raise ConfigError(f"layout {text!r}: recompute {value!r} is not none|gau|layer")
            values[key] = value
        elif key == "sp":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"layout {text!r}: sp must be true or false")
            values[key] = value.lower() in ("true", "1")
        else:
            if not value.isdigit() or int(value) < (0 if key == "zero" else 1):
                raise ConfigError(f"layout {text!r}: {key} must be a positive integer")
            values[key] = int(value)
    split = values["tp"] * values["cp"] * values["pp"]
    if world % split:
        raise ConfigError(
            f"layout {text!r}: {world} ranks are not a multiple of tp x cp x pp = {split}"
        )
    return Layout(
        values["tp"], values["cp"], values["pp"], world // split, values["zero"],
        values["recompute"], bool(values["sp"]) and values["tp"] > 1, values["vp"],
    )  # fmt: skip


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamCount:
    """Parameter elements of the whole model, by where they live."""

    embedding: int  # split over tp (vocab-parallel)
    head: int  # untied head, split over tp (0 when tied)
    final_norm: int
    layer_split: int  # one layer's elements split over tp
    layer_whole: int  # one layer's elements replicated over tp
    largest_split: int  # the largest single split parameter (ZeRO-3 gathers one at a time)


def vocab_size_of(cfg: Config) -> int:
    tok = cfg.data.tokenizer
    return 257 if tok.kind == "byte" else tok.vocab_size


def count_parameters(cfg: Config) -> tuple[ParamCount, int]:
    """Exact counts from the model built on the meta device; and the number of layers."""
    from parallel.layout import is_split
    from pretrain.model.lm import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(replace(cfg.model, layers=1), vocab_size_of(cfg))
    split = whole = embedding = head = final_norm = largest = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("layers."):
            if is_split(p):
                split += n
                largest = max(largest, n)
            else:
                whole += n
        elif name.startswith("embedding."):
            embedding += n
        elif name.startswith("head."):
            head += n
        else:
            final_norm += n
    largest = max(largest, embedding, head)
    return ParamCount(embedding, head, final_norm, split, whole, largest), cfg.model.layers


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes per rank (the busiest rank of the layout)."""

    layout: Layout
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float  # allocated before the backward: they add to the activations' peak
    # Written during the backward, as gradients become final: by then the layers that
    # produced them have freed their activations, so these compete with the activations'
    # peak (at the start of the backward) through the maximum.
    backward_buffers: float = 0.0

    @property
    def total(self) -> float:
        return (1 + SLACK) * (
            self.weights + self.gradients + self.optimizer
            + max(self.activations, self.backward_buffers) + self.buffers
        )  # fmt: skip


def _dtype_bytes(cfg: Config) -> tuple[int, int, int]:
    """(master weight bytes, activation bytes, EMA compute bytes)."""
    precision = cfg.train.precision
    if precision == "fp64":
        return 8, 8, 8
    return 4, 2 if precision == "bf16" else 4, 4


def layer_activation_bytes(
    cfg: Config, layout: Layout, ratio: float, mode: str, device: str
) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one rank, in ``mode``.

    The terms are the tensors autograd saves in ``pretrain/model/layer.py`` (read off the
    graph with ``saved_tensors_hooks``, storages counted once, parameters left out)."""
    m, t = cfg.model, cfg.train
    _, act, ema_b = _dtype_bytes(cfg)
    tp, cp = layout.tp, layout.cp
    length = t.seq_length // cp
    batch = t.micro_batch_size
    tokens = length * batch
    seq_tokens = tokens // tp if layout.sp else tokens  # the residual stream's tokens
    width, channels = m.width, m.width // tp
    layer_input = seq_tokens * width * act
    if mode == "layer":
        return layer_input
    # The residual stream: the norm's input and the output silu's input.
    residual = 2 * seq_tokens * width * act
    # Channel-split, every token: the EMA's input, its output (silu input), the projection's
    # input.
    dense = 3 * tokens * channels * act
    # Inside the EMA (its compute dtype): the input as chunk rows, the [C, N, k] powers twice,
    # the states entering each chunk (3 x [C, n B, N]) and the chunk convolution: the
    # [C, k, k] Toeplitz matrix up to MATMUL_CONV_MAX, above it the rows' spectra.
    from pretrain.model.ema import MATMUL_CONV_MAX
    from pretrain.model.gau import query_block

    chunk = m.ema_chunk if 0 < m.ema_chunk < length else length
    n_chunks = -(-length // chunk)
    conv = channels * chunk * chunk if chunk <= MATMUL_CONV_MAX else 2 * tokens * channels
    ema = ema_b * (tokens * channels + conv + 2 * channels * m.ndim * chunk
                   + 3 * channels * n_chunks * batch * m.ndim)  # fmt: skip
    gau = 0.0
    if m.routing != "never":
        if m.routing == "sparse":
            dense += tokens * width * act  # the GAU output the gate multiplies
        per_seq = min(1.0, ratio) * length + (m.window if cp > 1 else 0)
        compressed = per_seq * batch
        hidden = m.hdim // tp
        keys = m.window + query_block(m.window, m.attention_block)  # per window of b queries
        # Per activated token: the projections' input (D); z's silu input, z x scale, the
        # queries, the keys (the windows view them) and, with RoPE, cos and sin of q and k
        # (Z / 2 each); r's and v's silu inputs, attention output and r (the product's
        # inputs), the product (out_proj's input) and the values. Keys and values are kept
        # behind w zero slots per sequence.
        z_terms = 4 + (2 if m.position == "rotary" else 0)
        gau = compressed * act * (width + z_terms * m.zdim + 6 * hidden)
        gau += m.window * batch * act * (m.zdim + hidden)
        fused = (m.attention_fn == "softmax" and m.position in ("rotary", "none")
                 and m.attention_dropout == 0)  # fmt: skip
        if not fused:  # relu2 / positional biases / attention dropout: two [b, w + b] blocks
            gau += compressed * 2 * keys * act
        else:
            # One [b, w + b] block per window either way, for different reasons (device-
            # dependent): PyTorch's CPU SDPA runs the math path for the GAU's H != Z and
            # keeps the attention probabilities; CUDA's memory-efficient kernel keeps the
            # additive mask SDPA builds from our boolean one (its ``attn_bias`` input), plus
            # the logsumexp of each query (fp32).
            gau += compressed * keys * act
            if device == "cuda":
                gau += compressed * 4
        if m.hidden_dropout > 0:
            gau += compressed * hidden
        if m.attention_dropout > 0:
            gau += compressed * keys
    masks = (tokens * channels + seq_tokens * width) if m.dropout > 0 else 0
    ffn = 0.0
    if m.ffn_hidden:
        ffn = act * (seq_tokens * width + tokens * width + 2 * tokens * m.ffn_hidden // tp)
    if mode == "gau":
        gau = 0.0
        if m.routing == "sparse":
            dense -= act * tokens * width
    return residual + dense + ema + gau + masks + ffn


def backward_workspace(cfg: Config, layout: Layout, ratio: float) -> float:
    """Bytes a layer's backward holds beside the saved tensors it has not freed yet: the
    gradient of its largest tensor, the value windows ([I, w + b, H / tp], (w + b) / b per
    activated token)."""
    m, t = cfg.model, cfg.train
    _, act, _ = _dtype_bytes(cfg)
    if m.routing == "never":
        return 2 * t.seq_length // layout.cp * t.micro_batch_size * m.width * act
    from pretrain.model.gau import query_block

    per_seq = min(1.0, ratio) * t.seq_length // layout.cp + (m.window if layout.cp > 1 else 0)
    block = query_block(m.window, m.attention_block)
    copies = (m.window + block) / block
    return copies * per_seq * t.micro_batch_size * m.hdim // layout.tp * act


def estimate(cfg: Config, layout: Layout, ratio: float = 1.0, device: str = "cuda") -> Estimate:
    """Per-rank bytes of ``layout`` for ``cfg`` (already valid for it)."""
    from parallel.zero_config import CPU_BUCKET, GPU_BUCKET

    params, layers = count_parameters(cfg)
    t, m = cfg.train, cfg.model
    master, act, _ = _dtype_bytes(cfg)
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, layout.zero
    chunks = pp * layout.vp
    per_chunk = math.ceil(layers / chunks)
    layer_params = params.layer_split / tp + params.layer_whole
    embedding = params.embedding / tp
    head = params.head / tp
    tied_copy = embedding if (m.tie_embeddings and pp > 1) else 0.0
    # The busiest rank: the first (embedding, most micro-batches in flight) or the last
    # (head, logits); each holds ``vp`` chunks of layers.
    first_params = embedding + layout.vp * per_chunk * layer_params
    last_params = head + tied_copy + params.final_norm + layout.vp * per_chunk * layer_params
    if pp == 1:
        first_params = last_params = embedding + head + params.final_norm + layers * layer_params
    local = max(first_params, last_params)

    weights = local * master
    if zero == 3:
        weights = local * master / dp + 2 * params.largest_split / tp * master
    gradients = local * master if zero < 2 else local * master / dp
    if zero == 0:
        optimizer = 2 * local * master  # Adam's two moments
    else:
        optimizer = 3 * local * 4 / dp  # DeepSpeed's fp32 master copy and two moments
        if zero == 1:
            gradients += local * 4 / dp  # the reduced partition

    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    none_layer = layer_activation_bytes(cfg, layout, ratio, "none", device)
    kept_layer = layer_activation_bytes(cfg, layout, ratio, layout.recompute, device)
    if pp == 1:
        held_layers = layers
    elif layout.vp == 1:
        held_layers = min(micro_batches, pp) * per_chunk
    else:
        in_flight = 2 * (pp - 1) + (layout.vp - 1) * pp + 1
        held_layers = min(micro_batches * layout.vp, in_flight) * per_chunk
    tokens = t.seq_length // layout.cp * t.micro_batch_size
    seq_tokens = tokens // tp if layout.sp else tokens
    vocab = params.embedding / m.width / tp
    # At the start of the loss's backward: the logits, the log-softmax kept by the loss,
    # the gradient of the log-softmax and of the logits (fp32; under bf16 autocast also the
    # bf16 logits), and the final norm's input and output.
    logits = tokens * vocab * (4 * 4 + (2 if act == 2 else 0)) + 2 * seq_tokens * m.width * act
    # During a layer's backward: what its recompute made again (gau: the GAU's part;
    # layer: the whole layer) and the backward's own workspace. The layers' saved tensors
    # are freed as their backward runs, so the loss's transient (logits) and a layer's
    # never coexist.
    recomputed = none_layer - kept_layer
    layer_transient = recomputed + backward_workspace(cfg, layout, ratio)
    activations_first = held_layers * kept_layer + layer_transient
    activations_last = per_chunk * layout.vp * kept_layer + max(logits, layer_transient)
    if pp == 1:
        activations = layers * kept_layer + max(logits, layer_transient)
    else:
        activations = max(activations_first, activations_last)
    # The optimizer step runs after the activations are freed: its temporaries (one
    # parameter-sized buffer for the foreach update) compete with the activations only
    # through the maximum.
    step_temporaries = local * master if zero == 0 else local * 4 / dp
    activations = max(activations, step_temporaries)

    buffers = backward_buffers = 0.0
    if zero in (1, 2):
        # DeepSpeed allocates its gradient bucket(s) at the start of each backward
        # (``setup_buckets``). On a GPU the allocation counts whole from then on; on a CPU
        # (device-dependent) a fresh allocation's pages become resident only as gradients
        # are copied into it, i.e. as the layers that produce them free their activations.
        if device == "cuda":
            buffers += GPU_BUCKET * 4 * (2 if zero == 2 else 1)
        else:
            backward_buffers += min(CPU_BUCKET, local) * 4
    elif zero == 0 and dp * layout.cp > 1 and pp == 1 and cfg.parallel.overlap_grad_reduce:
        # parallel/grads.py OverlappedGradReduce: a bucket is flattened and sent once its
        # gradients are final, during the last backward: two in flight at most.
        backward_buffers += 2 * min(cfg.parallel.grad_bucket_mb * 2**20, local * master)
    if pp > 1:
        buffers += 2 * seq_tokens * m.width * master  # p2p send and receive
    return Estimate(layout, weights, gradients, optimizer, activations, buffers, backward_buffers)


# --------------------------------------------------------------------------- the search


def check_layout(cfg: Config, layout: Layout) -> str | None:
    """Why ``layout`` cannot run ``cfg`` (the config validation's message), or None."""
    try:
        run = layout.apply(cfg)
        validate(run)
        micro_batches_per_step(run, layout.dp)
        if layout.zero and layout.dp * layout.cp == 1:
            return "ZeRO shards over data x context ranks: there is only one"
    except ConfigError as e:
        return str(e)
    return None


def candidate_layouts(world: int, cfg: Config) -> list[Layout]:
    """Every tp x cp x pp dividing ``world`` (tp within a node's GPUs is the caller's
    concern), with sequence parallelism on whenever tp > 1, every ZeRO stage and recompute
    mode."""
    out = []
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for tp in divisors:
        for cp in divisors:
            for pp in divisors:
                if world % (tp * cp * pp):
                    continue
                for zero in (0, 1, 2, 3):
                    for mode in RECOMPUTE_MODES:
                        out.append(Layout(tp, cp, pp, world // (tp * cp * pp), zero, mode,
                                          tp > 1, 1))  # fmt: skip
    return out


def cost_key(layout: Layout, micro_batches: int) -> tuple:
    """Lower is faster (a heuristic, not a measurement): recompute's extra forward, then the
    pipeline bubble, then the model-parallel degree (tensor, context traffic), then the
    ZeRO stage's extra traffic."""
    recompute = {"none": 0.0, "gau": 0.1, "layer": 0.33}[layout.recompute]
    bubble = (layout.pp - 1) / max(1, micro_batches) if layout.pp > 1 else 0.0
    return (round(recompute + bubble, 3), layout.tp * layout.cp, layout.cp, layout.zero)


@dataclass
class Plan:
    given: Estimate | None
    given_problem: str | None
    fitting: list[Estimate]
    rejected: list[tuple[Layout, str]]


def plan(
    cfg: Config, world: int, gpu_memory: int, ratio: float = 1.0, given: Layout | None = None,
    gpus_per_node: int | None = None, device: str = "cuda",
) -> Plan:  # fmt: skip
    """The given layout's estimate and the ranked layouts of ``world`` ranks that fit."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"activation ratio must be in (0, 1], got {ratio}")
    given = given or layout_of(cfg, world)
    problem = check_layout(cfg, given)
    given_estimate = None if problem else estimate(cfg, given, ratio, device)
    fitting, rejected = [], []
    needs: dict[Layout, float] = {}
    for layout in candidate_layouts(world, cfg):
        reason = check_layout(cfg, layout)
        if reason is None and gpus_per_node and layout.tp > gpus_per_node:
            reason = f"tensor parallel {layout.tp} spans nodes ({gpus_per_node} GPUs per node)"
        if reason is None:
            e = estimate(cfg, layout, ratio, device)
            if e.total <= gpu_memory:
                fitting.append(e)
                continue
            needs[layout] = e.total
            reason = f"needs {gib(e.total)} GiB per rank > {gib(gpu_memory)} GiB"
        rejected.append((layout, reason))

    def key(e: Estimate) -> tuple:
        micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * e.layout.dp)
        return (*cost_key(e.layout, micro), e.total)

    fitting.sort(key=key)
    # The near misses first (too big, smallest first), then the layouts that cannot run.
    rejected.sort(key=lambda lr: (lr[0] not in needs, needs.get(lr[0], 0.0), lr[1]))
    return Plan(given_estimate, problem, fitting, rejected)


def format_estimate(e: Estimate, limit: int) -> str:
    rows = [
        ("weights", e.weights), ("gradients", e.gradients), ("optimizer state", e.optimizer),
        ("activations", e.activations), ("communication buffers", e.buffers),
        ("buffers during backward", e.backward_buffers),
        (f"slack ({SLACK:.0%})", e.total / (1 + SLACK) * SLACK),
    ]  # fmt: skip
    lines = [f"layout {e.layout.name()} (per rank, GiB):"]
    lines += [f"  {name:<24}{gib(value):>9}" for name, value in rows]
    verdict = "fits" if e.total <= limit else "does NOT fit"
    lines.append(f"  {'total':<24}{gib(e.total):>9}  {verdict} in {gib(limit)} GiB")
    return "\n".join(lines)


def format_plan(p: Plan, limit: int, ratio: float, show: int = 15, show_all: bool = False) -> str:
    lines = [f"activation ratio assumed: {ratio:g} (--activation-ratio)"]
    if p.given is not None:
        lines.append(format_estimate(p.given, limit))
    else:
        lines.append(f"the given layout cannot run: {p.given_problem}")
    lines.append(f"\n{len(p.fitting)} layouts fit, fastest first (heuristic order):")
    lines.append(f"  {'layout':<40}{'total GiB':>10}{'weights':>9}{'grads':>8}{'optim':>8}"
                 f"{'activ.':>8}{'buffers':>8}")  # fmt: skip
    for e in p.fitting[:show]:
        lines.append(
            f"  {e.layout.name():<40}{gib(e.total):>10}{gib(e.weights):>9}"
            f"{gib(e.gradients):>8}{gib(e.optimizer):>8}{gib(e.activations):>8}"
            f"{gib(e.buffers):>8}"
        )
    if len(p.fitting) > show:
        lines.append(f"  ... {len(p.fitting) - show} more")
    lines.append(f"\n{len(p.rejected)} layouts do not fit or cannot run:")
    listed = p.rejected if show_all else p.rejected[:show]
    for layout, reason in listed:
        lines.append(f"  {layout.name():<40}{reason}")
    if len(listed) < len(p.rejected):
        lines.append(f"  ... {len(p.rejected) - len(listed)} more (--all lists every one)")
    return "\n".join(lines)
