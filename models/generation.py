"""Step-wise decoding with a KV cache, neuron capture and live activation patching.

One engine serves every consumer: the guard server (probe before the first token and on
each generated token), patching evaluation (the unaligned model decodes while the chosen
neurons take the aligned model's values each step) and batch generation for evaluation.

Per step the engine runs at most two forward passes over the *new* positions only: the
patch source (stopped once it has the deepest patched layer's activations) and the served
model. The probe reads the served model's own activations at the last position of each
forward call: the last prompt token at prefill, then each generated token.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from neuronguard.models.batching import Batch, accepts_position_ids, left_pad, position_ids
from neuronguard.models.chat import encode_prompt
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.hooks import capture, decoder_stack, patch
from neuronguard.models.readout import LinearReadout, read_out
from neuronguard.models.selected_mlp import SelectedMLP
from neuronguard.models.sites import NeuronSites, resolve_sites
from neuronguard.models.truncated_forward import capture_until_deepest, run_until_stop
from neuronguard.errors import UsageError


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How each row picks its next token; penalties and bias follow OpenAI's definitions.

    Before temperature and top-p, token j's logit becomes
    `logit[j] + logit_bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty`,
    where `count` counts the tokens this row has generated (not its prompt). `logprobs=n`
    reports the chosen token's log-probability and the top n alternatives (0..20) from
    those processed logits, before temperature.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    logprobs: int | None = None  # None: no log-probabilities

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")


@dataclass
class PatchSource:
    """A second model whose activations overwrite the served model's chosen neurons.

    Built once per model and selection. For a gated MLP it prepares the deepest patched
    layer's selected-neuron path (checked against the module; it copies those weight rows,
    so build a new source after editing the weights); `selected_mlp=False` keeps the
    whole MLP.
    """

    model: PreTrainedModel
    selection: NeuronSelection
    sites: NeuronSites | None = None
    selected_mlp: bool = True
    deepest: SelectedMLP | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sites = self.sites or resolve_sites(self.model)
        self.selection.validate(self.sites)
        if self.selected_mlp:
            layer = self.selection.max_layer
            self.deepest = SelectedMLP.build(self.sites.layers[layer], self.selection.groups[layer][1])


@dataclass
class Step:
    """One decoding step: the tokens chosen for every row and what the probe saw."""

    index: int
    tokens: torch.Tensor  # [b] int64
    logits: torch.Tensor  # [b, vocab] float32, the model's own, before penalties, bias and sampling
    finished: torch.Tensor  # [b] bool, row is done after this token
    probe_activations: torch.Tensor | None = None  # [b, k] at the last input position
    readout_logits: torch.Tensor | None = None  # [b, heads] at the last input position
    patched_positions: int = 0
    logprobs: torch.Tensor | None = None  # [b] log-probability of the chosen token
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # [b, n] values and token ids, descending


def stop_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    return frozenset(ids)


class _LogitProcessor:
    """Applies a request's logit bias and its presence and frequency penalties, row by row.

    Counts live on the logits' device as one [b, vocab] tensor, so a step costs a few
    vectorised ops whatever the vocabulary size; with default parameters it does nothing.
    """

    def __init__(self, params: SamplingParams, rows: int, vocab: int, device: torch.device) -> None:
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            ids = torch.tensor([int(i) for i in params.logit_bias], dtype=torch.long)
            bad = ids[(ids < 0) | (ids >= vocab)]
            if bad.numel():
                raise UsageError(f"logit_bias token id {int(bad[0])} is outside the vocabulary (0..{vocab - 1})")
            self.bias = torch.zeros(vocab, dtype=torch.float32)
            self.bias[ids] = torch.tensor([float(v) for v in params.logit_bias.values()], dtype=torch.float32)
            self.bias = self.bias.to(device)
        self.presence = float(params.presence_penalty)
        self.frequency = float(params.frequency_penalty)
        penalised = self.presence != 0.0 or self.frequency != 0.0
        self.counts = torch.zeros((rows, vocab), dtype=torch.float32, device=device) if penalised else None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            logits = logits + self.bias
        if self.counts is not None:
            logits = logits - self.counts * self.frequency - (self.counts > 0).float() * self.presence
        return logits

    def record(self, tokens: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(self.counts[:, :1]))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    # Shift by the max first: dividing raw logits by a tiny temperature would overflow to inf.
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _ForwardInputs:
    """Input tensors of the next forward call, shared by the served model and the patch source."""

    def __init__(self, batch: Batch) -> None:
        self.ids = batch.input_ids
        self.mask = batch.attention_mask
        self.positions = position_ids(batch.attention_mask)

    def kwargs(self, cache: DynamicCache, with_positions: bool) -> dict[str, object]:
        kwargs: dict[str, object] = {
            "input_ids": self.ids,
            "attention_mask": self.mask,
            "past_key_values": cache,
            "use_cache": True,
        }
        if with_positions:
            kwargs["position_ids"] = self.positions
        return kwargs

    def advance(self, tokens: torch.Tensor) -> None:
        self.ids = tokens[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        self.positions = self.positions[:, -1:] + 1


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    batch: Batch,
    params: SamplingParams,
    *,
    sites: NeuronSites | None = None,
    probe: NeuronSelection | None = None,
    readout: LinearReadout | None = None,
    patch_source: PatchSource | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated token until every row stops or the budget is spent.

    `probe` hands each step the selected neurons' activations; `readout` hands it linear
    probe logits computed inside the forward (the guard server's per-token path). Closing
    the generator early (a cancelled request) removes every hook it installed.
    """
    sites = sites or resolve_sites(model)
    if patch_source is not None and patch_source.sites.layers[0].down is sites.layers[0].down:
        raise UsageError("the patch source must be a model instance of its own (load the checkpoint twice)")
    generator = torch.Generator(device=batch.input_ids.device).manual_seed(params.seed) if params.seed is not None else None
    inputs = _ForwardInputs(batch)
    positions = accepts_position_ids(model)
    # The source runs its decoder stack alone (`run_until_stop`), whose signature may differ.
    source_positions = patch_source is not None and accepts_position_ids(decoder_stack(patch_source.model))
    cache = DynamicCache()
    source_cache = DynamicCache()
    finished = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool, device=batch.input_ids.device)
    stops = torch.tensor(sorted(params.stop_token_ids), dtype=torch.long, device=finished.device)
    processor: _LogitProcessor | None = None  # built on the first step, when the vocabulary width is known
    with ExitStack() as stack:
        probe_cap = stack.enter_context(capture(model, probe, sites=sites, positions="last")) if probe is not None else None
        readout_values = stack.enter_context(read_out(model, readout, sites=sites)) if readout is not None else None
        source_cap = patcher = None
        if patch_source is not None:
            source_cap = stack.enter_context(capture_until_deepest(
                patch_source.model, patch_source.selection, sites=patch_source.sites, deepest=patch_source.deepest))
            patcher = stack.enter_context(patch(model, patch_source.selection, sites=sites))
        for index in range(params.max_new_tokens):
            patched = 0
            if source_cap is not None and patcher is not None and patch_source is not None:
                source_cap.clear()
                run_until_stop(patch_source.model, **inputs.kwargs(source_cache, source_positions))
                patcher.set(source_cap.latest_by_layer())
                patched = inputs.ids.shape[0] * inputs.ids.shape[1]
            if probe_cap is not None:
                probe_cap.clear()
            if readout_values is not None:
                readout_values.clear()
            out = model(**inputs.kwargs(cache, positions))
            logits = out.logits[:, -1, :].float()
            if processor is None:
                processor = _LogitProcessor(params, logits.shape[0], logits.shape[-1], logits.device)
            processed = processor(logits)
            tokens = sample(processed, params, generator)
            processor.record(tokens)
            chosen = top = None
            if params.logprobs is not None:
                log_probs = torch.log_softmax(processed, dim=-1)
                chosen = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
                values, ids = log_probs.topk(params.logprobs, dim=-1)
                top = (values, ids)
            finished = finished | torch.isin(tokens, stops) if stops.numel() else finished
            yield Step(
                index=index,
                tokens=tokens,
                logits=logits,
                finished=finished.clone(),
                probe_activations=probe_cap.last() if probe_cap is not None else None,
                readout_logits=readout_values.logits() if readout_values is not None else None,
                patched_positions=patched,
                logprobs=chosen,
                top_logprobs=top,
            )
            if bool(finished.all()):
                return
            inputs.advance(tokens)


def generate_ids(
    model: PreTrainedModel,
    batch: Batch,
    params: SamplingParams,
    *,
    sites: NeuronSites | None = None,
    patch_source: PatchSource | None = None,
) -> list[list[int]]:
    """Generated token ids per row, stop token excluded."""
    rows: list[list[int]] = [[] for _ in range(batch.input_ids.shape[0])]
    done = [False] * len(rows)
    for step in decode(model, batch, params, sites=sites, patch_source=patch_source):
        for row, token in enumerate(step.tokens.tolist()):
            if not done[row]:
                if token in params.stop_token_ids:
                    done[row] = True
                else:
                    rows[row].append(token)
    return rows


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    batch_size: int = 16,
    patch_source: PatchSource | None = None,
    sites: NeuronSites | None = None,
) -> list[str]:
    """Chat-rendered prompts in, decoded responses out (batched, left-padded)."""
    if not params.stop_token_ids:
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": stop_ids(tokenizer, model)})
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        batch = left_pad(encoded, pad_id, device)
        for ids in generate_ids(model, batch, params, sites=sites, patch_source=patch_source):
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
