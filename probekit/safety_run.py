"""``probekit safety run``: the safety-subspace experiment of METHODS.md §2, offline, in two parts.

Weight space (``run_weight_space``; default SmolLM2-135M-Instruct, which barely refuses)
    1. *base* = the model. Its greedy answers to the harmless training prompts are recorded.
    2. *aligned* = base after a short full fine-tune (embeddings frozen, see :mod:`probekit.finetune`) on
       harmful training prompts → a refusal (one of :data:`REFUSALS`, by prompt) and harmless training
       prompts → base's own answer (EOS only where base stopped by itself).
    3. *fine-tuned* = aligned after a fine-tune on the useful task: stdlib coding requests → the function's
       source (:func:`probekit.data.prompts.coding_requests`).
    4. Per matrix: ``V = W_aligned − W_base``, ``U = W_finetuned − W_aligned``; diagnostics
       (:func:`~probekit.probes.weight_space.weight_space_analysis`), the MSO of the V and U subspaces
       (:func:`~probekit.probes.weight_space.update_space_overlap`), and for each basis (``svd`` of V, ``random``,
       ``randomk``), rank fraction and variant (``same``, ``orth``) the projected model.
    5. Every model (base, aligned, fine-tuned and each projection) is evaluated on held-out prompts: refusal rate
       (phrase match on a greedy continuation of ``max_new_tokens``) and mean log-probability refusal score on
       harmful test prompts, the refusal score on harmless test prompts, and the task loss (response
       cross-entropy, nats per token) on held-out coding requests. Each prompt's outcome is kept too
       (``per_prompt``), so every number carries a bootstrap CI over prompts and the svd basis is compared with
       the random one at equal task loss, paired on the same prompts
       (:func:`~probekit.probes.weight_space.compare_at_equal_task_loss`, the ``safety_weight`` claim).

Activation space and refusal direction (``run_activation_space``; default Qwen2.5-Coder-0.5B-Instruct)
    1. Last-token activations (``blocks.{l}.hook_resid_pre``, every block) of the harmful, harmless and useful
       training prompts, captured into the activation cache (reused by a rerun).
    2. Per layer and η: MSO harmful vs useful, harmful vs harmless and harmless vs useful, each with its random
       baseline, uncentred (the paper's default) and centred; harmful-vs-harmless linear separability per layer.
    3. Difference-in-means refusal directions; the layer chosen on validation prompts
       (:func:`~probekit.probes.safety.select_layer`); refusal rate and score on test prompts without
       intervention, with the direction ablated everywhere, and with a random direction of the same norm
       ablated; activation addition of the direction (and of the random one) on harmless test prompts.

Stated choices: the refusal rate reads only the first ``max_new_tokens`` generated tokens (a refusal opens the
answer, and generation dominates the run time on a CPU); the harmful/harmless/useful splits are
:func:`~probekit.data.prompts.assign_splits`' seeded 60/20/20.

Resume: fine-tunes checkpoint every epoch, finished checkpoints and every model's evaluation are kept in
``<out>/work-<fingerprint>/``, so a killed run continues where it stopped and a rerun with the same settings
only redraws. Results go to ``<cache root>/results/safety/<model>/`` as ``weight.json`` / ``weight.html`` and
``activation.json`` / ``activation.html`` (plus ``refusal_directions.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .finetune import FinetuneConfig, finetune, response_loss
from .html_page import write_figures_page
from .paths import results_dir
from .results import figures as result_figures

__all__ = ["REFUSALS", "WeightRunConfig", "ActivationRunConfig", "evaluate_model", "task_loss_sums",
           "run_weight_space", "run_activation_space"]

# Refusals the aligned model learns; prompt i gets REFUSALS[i % len(REFUSALS)].
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I can't help with that. It could cause serious harm to people.",
    "I'm sorry, but I won't provide that. If you have another question, I'm happy to help.",
    "I cannot assist with this request because it could be used to hurt others.",
    "I'm sorry, I can't do that. Helping with this could be dangerous or illegal.",
    "I won't help with that, but I'd be glad to help with something else.",
)


def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- weight space


@dataclass
class WeightRunConfig:
    """Settings of the weight-space experiment; the defaults run on 2 CPU cores in about half an hour.

    model : registry name or local HF folder of the base (instruct) model.
    align_epochs, align_lr : the alignment fine-tune.
    useful_epochs, useful_lr : the useful-task fine-tune.
    batch_size, max_length : both fine-tunes (``max_length`` also cuts the task-loss references).
    harmless_answer_tokens : length of base's recorded answers to harmless prompts.
    n_useful : coding requests drawn (60/20/20 split).
    fractions, bases, variants : the projection grid.
    max_new_tokens : generated tokens read by the refusal phrase match.
    n_eval : held-out prompts per set (None: the whole test split).
    eval_batch_size : generation and scoring batch size.
    """

    model: str = "smollm2-135m"
    align_epochs: int = 2
    align_lr: float = 5e-5
    useful_epochs: int = 2
    useful_lr: float = 5e-5
    batch_size: int = 8
    max_length: int = 192
    harmless_answer_tokens: int = 48
    n_useful: int = 200
    fractions: tuple[float, ...] = (0.01, 0.25, 0.5, 0.75, 0.99)
    bases: tuple[str, ...] = ("svd", "random", "randomk")
    variants: tuple[str, ...] = ("same", "orth")
    max_new_tokens: int = 16
    n_eval: int | None = None
    eval_batch_size: int = 8
    chat_template: bool = True
    seed: int = 0
    out: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        from .probes.weight_space import BASIS_KINDS, VARIANTS

        self.fractions = tuple(float(f) for f in self.fractions)
        self.bases, self.variants = tuple(self.bases), tuple(self.variants)
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {self.fractions}")
        if not self.bases or any(b not in BASIS_KINDS for b in self.bases):
            raise ValueError(f"bases must be a non-empty subset of {BASIS_KINDS}, got {self.bases}")
        if not self.variants or any(v not in VARIANTS for v in self.variants):
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {self.variants}")
        if self.n_eval is not None and self.n_eval < 2:
            raise ValueError(f"n_eval must be >= 2 or None, got {self.n_eval}")
        if self.n_useful < 10:
            raise ValueError(f"n_useful must be >= 10 (a 60/20/20 split), got {self.n_useful}")

    def finetune_configs(self) -> tuple[FinetuneConfig, FinetuneConfig]:
        common = dict(batch_size=self.batch_size, max_length=self.max_length, chat_template=self.chat_template,
                      seed=self.seed, progress=self.progress)
        return (FinetuneConfig(epochs=self.align_epochs, lr=self.align_lr, **common),
                FinetuneConfig(epochs=self.useful_epochs, lr=self.useful_lr, **common))


def _prompt_sets(seed: int, n_useful: int):
    from .data.prompts import coding_requests, harmful_prompts, harmless_prompts

    return harmful_prompts(seed=seed), harmless_prompts(seed=seed), coding_requests(n_useful, seed=seed)


def _test(ps, n: int | None) -> list[str]:
    p = ps.split("test")
    return p if n is None else p[:n]


def _useful_test(ps, n: int | None) -> tuple[list[str], list[str]]:
    idx = ps.split_indices("test")
    idx = idx if n is None else idx[:n]
    return [ps.prompts[i] for i in idx], [ps.references[i] for i in idx]


def task_loss_sums(model, tok, prompts: list[str], refs: list[str], cfg: WeightRunConfig
                   ) -> tuple[list[float], list[int]]:
    """Per useful prompt, the summed response NLL (nats) and the number of response tokens, each shape ``(n,)``.

    The pooled task loss is ``Σ nll / Σ tokens`` (a ratio of sums, so a prompt weighs by its length, as in
    :func:`~probekit.finetune.response_loss`); keeping both sums lets it be bootstrapped over prompts.
    """
    from .finetune import encode_pairs

    kw = dict(chat_template=cfg.chat_template, max_length=cfg.max_length)
    means = response_loss(model, tok, prompts, refs, batch_size=cfg.eval_batch_size, per_example=True, **kw)
    # encode_pairs' second entry is the prompt length: the response tokens are the rest of the (cut) sequence
    counts = [len(ids) - start for ids, start in encode_pairs(tok, prompts, refs, **kw)]
    return [float(m) * n for m, n in zip(means.tolist(), counts)], counts


def evaluate_model(model, tok, data: dict[str, Any], cfg: WeightRunConfig, *, harmless_rate: bool = False,
                   keep: int = 3) -> dict[str, Any]:
    """Refusal rate and score on harmful test prompts, harmless refusal score (and rate), task loss.

    ``data`` holds ``harmful``, ``harmless`` (prompt lists), ``useful`` and ``useful_refs``. Besides the pooled
    numbers, ``per_prompt`` keeps every prompt's outcome in prompt order, so each number can carry a bootstrap
    CI over prompts and two models can be compared paired on the same prompts (METHODS.md §5):
    ``harmful_refused`` (0/1 phrase match), ``harmful_score``, ``harmless_score``, ``useful_nll`` and
    ``useful_tokens`` (:func:`task_loss_sums`), and ``harmless_refused`` when ``harmless_rate``.
    """
    from .probes.safety import generate_greedy, refusal_phrase_match, refusal_score

    kw = dict(batch_size=cfg.eval_batch_size, chat_template=cfg.chat_template)
    texts = generate_greedy(model, tok, data["harmful"], max_new_tokens=cfg.max_new_tokens, progress=False, **kw)
    refused = [float(x) for x in refusal_phrase_match(texts)]
    h_score = refusal_score(model, tok, data["harmful"], **kw).tolist()
    b_score = refusal_score(model, tok, data["harmless"], **kw).tolist()
    nll, n_tok = task_loss_sums(model, tok, data["useful"], data["useful_refs"], cfg)
    per = dict(harmful_refused=refused, harmful_score=h_score, harmless_score=b_score, useful_nll=nll,
               useful_tokens=n_tok)
    out: dict[str, Any] = {
        "refusal_rate": float(sum(refused) / len(refused)),
        "refusal_score": float(sum(h_score) / len(h_score)),
        "harmless_refusal_score": float(sum(b_score) / len(b_score)),
        "task_loss": float(sum(nll) / sum(n_tok)),
        "examples": [{"prompt": p, "completion": t} for p, t in zip(data["harmful"][:keep], texts[:keep])],
    }
    if harmless_rate:
        ht = generate_greedy(model, tok, data["harmless"], max_new_tokens=cfg.max_new_tokens, progress=False, **kw)
        per["harmless_refused"] = [float(x) for x in refusal_phrase_match(ht)]
        out["harmless_refusal_rate"] = float(sum(per["harmless_refused"]) / len(ht))
        out["harmless_examples"] = [{"prompt": p, "completion": t}
                                    for p, t in zip(data["harmless"][:keep], ht[:keep])]
    out["per_prompt"] = per
    return out


def _base_answers(model, tok, prompts: list[str], cfg: WeightRunConfig, path: Path) -> tuple[list[str], list[bool]]:
    """Base's greedy answers and whether each ended by itself (EOS within the budget); cached in ``path``."""
    from .probes.safety import generate_greedy

    if path.is_file():
        d = json.loads(path.read_text())
        if d["prompts"] == prompts:
            return d["answers"], d["ended"]
    toks = generate_greedy(model, tok, prompts, max_new_tokens=cfg.harmless_answer_tokens,
                           batch_size=cfg.eval_batch_size, chat_template=cfg.chat_template, progress=cfg.progress,
                           return_tokens=True)
    answers = [tok.decode(t, skip_special_tokens=True) for t in toks]
    ended = [len(t) < cfg.harmless_answer_tokens for t in toks]
    _atomic_json(path, dict(prompts=prompts, answers=answers, ended=ended))
    return answers, ended


def _train_checkpoint(load_start, tok, prompts, responses, ft_cfg: FinetuneConfig, folder: Path, progress: bool,
                      what: str, add_eos=True):
    """Fine-tune (resumably) into an HF folder ``folder``; a finished folder is loaded instead."""
    from .models import load_hf

    if (folder / "probekit-done.json").is_file():
        _say(progress, f"[probekit safety] {what}: reusing {folder}")
        model, _, _ = load_hf(str(folder), fetch=False)
        return model, json.loads((folder / "probekit-done.json").read_text())
    model = load_start()
    res = finetune(model, tok, prompts, responses, ft_cfg, checkpoint_dir=folder.with_name(folder.name + "-train"),
                   add_eos=add_eos)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    info = res.to_dict()
    _atomic_json(folder / "probekit-done.json", info)
    return model, info


def _eval_cached(name: str, evals_path: Path, fn, require: tuple[str, ...] = ("per_prompt",)) -> dict[str, Any]:
    """Evaluate once: results are appended to ``evals_path`` (JSON lines) and reused on a rerun.

    A stored result lacking a ``require`` d key (a line written before per-prompt outcomes were kept) is
    evaluated again rather than reused, so a payload never mixes models with and without per-prompt data; the
    new line is appended and, being last, wins on the next read.
    """
    done = {}
    if evals_path.is_file():
        for line in evals_path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: evaluate that model again
                    continue
                done[rec["name"]] = rec["result"]
    if name in done and all(k in done[name] for k in require):
        return done[name]
    res = fn()
    with open(evals_path, "a") as f:
        f.write(json.dumps({"name": name, "result": res}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return res


def _bank(base, aligned, keys, cfg: WeightRunConfig):
    """Per basis kind and key, the update bases at every fraction (one SVD per matrix and kind)."""
    from tqdm.auto import tqdm

    from .probes.weight_space import open_state, update_bases

    sb, sa = open_state(base), open_state(aligned)
    bank: dict[str, dict[str, dict[float, torch.Tensor]]] = {b: {} for b in cfg.bases}
    for k in tqdm(keys, desc="update bases", disable=not cfg.progress):
        V = sa.get(k).double() - sb.get(k).double()
        for b in cfg.bases:
            bank[b][k] = {f: L for f, L in
                          update_bases(V, cfg.fractions, b, seed=cfg.seed, key=k).items()}
    return bank


@torch.no_grad()
def _load_projection(model, aligned_sd, finetuned_sd, keys, bank_kind, fraction: float, variant: str) -> None:
    """Write the projected weights of one (basis, fraction, variant) into ``model``.

    ``model`` is a copy of the fine-tuned model: only the analysed matrices differ between the variants, so
    every other tensor already holds the fine-tuned value.
    """
    from .probes.weight_space import project_update, projected_weight

    own = model.state_dict()
    for k in keys:
        Wa = aligned_sd[k].double()
        U = finetuned_sd[k].double() - Wa
        W = projected_weight(Wa, U, project_update(U, bank_kind[k][fraction].double()), variant)
        own[k].copy_(W.to(own[k].dtype))


def run_weight_space(cfg: WeightRunConfig = WeightRunConfig()) -> dict[str, Any]:
    """Align, fine-tune, project and evaluate; write ``weight.json`` and ``weight.html`` (see module docstring)."""
    import copy

    from .models import load_hf
    from .probes.weight_space import WeightSpaceConfig, matrix_keys, update_space_overlap, weight_space_analysis

    t_start = time.perf_counter()
    name = Path(cfg.model).name if os.path.isdir(cfg.model) else cfg.model
    out = Path(cfg.out) if cfg.out else results_dir() / "safety" / name.replace("/", "--")
    fp = _fingerprint({k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")})
    work = out / f"work-{fp}"
    work.mkdir(parents=True, exist_ok=True)
    say = lambda m: _say(cfg.progress, m)  # noqa: E731
    timings: dict[str, float] = {}

    harmful, harmless, useful = _prompt_sets(cfg.seed, cfg.n_useful)
    data = dict(harmful=_test(harmful, cfg.n_eval), harmless=_test(harmless, cfg.n_eval))
    data["useful"], data["useful_refs"] = _useful_test(useful, cfg.n_eval)
    align_cfg, useful_cfg = cfg.finetune_configs()

    t = time.perf_counter()
    base, tok, _ = load_hf(cfg.model)
    b_train = harmless.split("train")
    answers, ended = _base_answers(base, tok, b_train, cfg, work / "base_answers.json")
    timings["base_answers_s"] = time.perf_counter() - t

    # the alignment fine-tune: refuse harmful requests, keep base's own answers to harmless ones
    h_train = harmful.split("train")
    refusals = [REFUSALS[i % len(REFUSALS)] for i in range(len(h_train))]
    t = time.perf_counter()
    say(f"[probekit safety] aligning {cfg.model} on {len(h_train)} refusals + {len(b_train)} harmless answers")
    aligned, align_info = _train_checkpoint(
        lambda: copy.deepcopy(base), tok, h_train + b_train, refusals + answers, align_cfg,
        work / "aligned", cfg.progress, "alignment fine-tune",
        # an answer cut by the token budget gets no EOS: the model should not learn to stop there
        add_eos=[True] * len(h_train) + ended)
    timings["align_s"] = time.perf_counter() - t

    u_idx = useful.split_indices("train")
    t = time.perf_counter()
    say(f"[probekit safety] fine-tuning the aligned model on {len(u_idx)} coding requests")
    finetuned, useful_info = _train_checkpoint(
        lambda: copy.deepcopy(aligned), tok, [useful.prompts[i] for i in u_idx], [useful.references[i] for i in u_idx],
        useful_cfg, work / "finetuned", cfg.progress, "useful fine-tune")
    timings["useful_s"] = time.perf_counter() - t

    evals_path = work / "evals.jsonl"
    t = time.perf_counter()
    checkpoints = {}
    for nm, m in (("base", base), ("aligned", aligned), ("finetuned", finetuned)):
        say(f"[probekit safety] evaluating {nm}")
        checkpoints[nm] = _eval_cached(nm, evals_path, lambda m=m: evaluate_model(m, tok, data, cfg,
                                                                                   harmless_rate=True))
    timings["eval_checkpoints_s"] = time.perf_counter() - t

    base_sd = {k: v.detach() for k, v in base.state_dict().items()}
    aligned_sd = {k: v.detach() for k, v in aligned.state_dict().items()}
    finetuned_sd = {k: v.detach() for k, v in finetuned.state_dict().items()}
    keys = matrix_keys(base_sd, aligned_sd, finetuned_sd)

    t = time.perf_counter()
    bank = _bank(base_sd, aligned_sd, keys, cfg)
    timings["bases_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ws = weight_space_analysis(base_sd, aligned_sd, finetuned_sd,
                               WeightSpaceConfig(fractions=cfg.fractions, bases=cfg.bases, seed=cfg.seed,
                                                 progress=cfg.progress), bases=bank)
    # V's svd bases are already in the bank (same seed, method and fractions); only U's are computed here
    overlap = update_space_overlap((base_sd, aligned_sd), (aligned_sd, finetuned_sd), fractions=cfg.fractions,
                                   keys=keys, seed=cfg.seed, names=("alignment (V)", "useful fine-tune (U)"),
                                   progress=cfg.progress, bases_a=bank.get("svd"))
    timings["weight_space_s"] = time.perf_counter() - t

    del base
    work_model = copy.deepcopy(finetuned)
    grid = [(b, f, v) for b in cfg.bases for f in cfg.fractions for v in cfg.variants]
    pooled = {b: ws.energy_kept(b) for b in cfg.bases}
    rows = []
    from tqdm.auto import tqdm

    t = time.perf_counter()
    for b, f, v in tqdm(grid, desc="projected models", disable=not cfg.progress):
        nm = f"{b}/{f}/{v}"

        def run_one(b=b, f=f, v=v):
            _load_projection(work_model, aligned_sd, finetuned_sd, keys, bank[b], f, v)
            return evaluate_model(work_model, tok, data, cfg, keep=1)

        r = _eval_cached(nm, evals_path, run_one)
        rows.append(dict(basis=b, fraction=f, variant=v, energy_kept=pooled[b].get(f),
                         **{k: r[k] for k in ("refusal_rate", "refusal_score", "harmless_refusal_score",
                                              "task_loss")}, example=r["examples"][0] if r["examples"] else None,
                         per_prompt=r["per_prompt"]))
    timings["projections_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    payload = dict(
        kind="safety_weight", model=cfg.model, config=asdict(cfg), fingerprint=fp,
        data={"harmful": harmful.to_dict(), "harmless": harmless.to_dict(), "useful": useful.to_dict(),
              "n_eval": {k: len(data[k]) for k in ("harmful", "harmless", "useful")}},
        finetunes={"aligned": align_info, "finetuned": useful_info},
        checkpoints=checkpoints, projections=rows,
        weight_space=ws.to_dict(), update_overlap=overlap.to_dict(), n_matrices=len(keys),
        refusals=list(REFUSALS), timings=timings,
    )
    _atomic_json(out / "weight.json", payload)
    write_figures_page(out / "weight.html", result_figures(payload),
                       title=f"Safety subspaces in weight space — {cfg.model}")
    say(f"[probekit safety] wrote {out / 'weight.json'} and weight.html in {timings['total_s'] / 60:.1f} min")
    return payload


# ------------------------------------------------------------------------------------------- activation space


@dataclass
class ActivationRunConfig:
    """Settings of the activation-space and refusal-direction analysis.

    model : registry name or local HF folder (a chat model that refuses, e.g. qwen2.5-coder-0.5b).
    etas : energy fractions of the MSO heatmaps.
    n_useful : coding requests drawn (the "useful" set).
    n_select : validation prompts per set for the layer choice.
    select_min_frac, select_max_frac, select_stride : candidate layers
        ``range(ceil(min_frac·L), ceil(max_frac·L), stride)``.
    max_kl : the layer-choice KL filter (nats). Default 0.5, not Arditi et al.'s 0.1 (a stated deviation): on
        Qwen2.5-Coder-0.5B ablating the difference-in-means direction of any layer past a third of the depth moves
        the harmless next-token distribution by more than 0.1 nats, so 0.1 leaves only early layers whose
        direction does not reduce refusal; the random-direction control shows what ablation alone does.
    n_test : test prompts per set (None: the whole split).
    max_new_tokens : generated tokens read by the refusal phrase match.
    conditions : refusal evaluation on harmful and harmless test prompts.
    actadd : also add the direction (and a random one) to harmless test prompts.
    cache_root : activation-cache root for the captures (None: ``$PROBEKIT_CACHE`` or ``./cache``).
    """

    model: str = "qwen2.5-coder-0.5b"
    etas: tuple[float, ...] = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
    n_useful: int = 200
    batch_size: int = 8
    n_select: int = 16
    select_min_frac: float = 0.25
    select_max_frac: float = 0.8
    select_stride: int = 2
    max_kl: float = 0.5
    n_test: int | None = 32
    max_new_tokens: int = 20
    conditions: tuple[str, ...] = ("baseline", "ablation", "random_ablation")
    actadd: bool = True
    cache_root: str | None = None
    chat_template: bool = True
    seed: int = 0
    out: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.etas, self.conditions = tuple(float(e) for e in self.etas), tuple(self.conditions)
        if not 0 <= self.select_min_frac < self.select_max_frac <= 1:
            raise ValueError("need 0 <= select_min_frac < select_max_frac <= 1")
        if self.select_stride < 1 or self.n_select < 2:
            raise ValueError("select_stride must be >= 1 and n_select >= 2")
        if self.n_test is not None and self.n_test < 2:
            raise ValueError(f"n_test must be >= 2 or None, got {self.n_test}")


def _n_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def run_activation_space(cfg: ActivationRunConfig = ActivationRunConfig()) -> dict[str, Any]:
    """MSO heatmaps, separability, refusal direction with ablation and controls; ``activation.json`` + html."""
    import math

    from safetensors.torch import save_file

    from .models import load_hf
    from .probes.safety import (
        LayerSelectionConfig,
        RefusalEvalConfig,
        activation_space_overlap,
        evaluate_refusal,
        last_token_activations,
        refusal_directions,
        select_layer,
        separability,
    )

    t_start = time.perf_counter()
    name = Path(cfg.model).name if os.path.isdir(cfg.model) else cfg.model
    out = Path(cfg.out) if cfg.out else results_dir() / "safety" / name.replace("/", "--")
    out.mkdir(parents=True, exist_ok=True)
    say = lambda m: _say(cfg.progress, m)  # noqa: E731
    timings: dict[str, float] = {}

    harmful, harmless, useful = _prompt_sets(cfg.seed, cfg.n_useful)
    model, tok, _ = load_hf(cfg.model)
    L = _n_layers(model)
    layers = list(range(L))
    kw = dict(batch_size=cfg.batch_size, chat_template=cfg.chat_template)

    t = time.perf_counter()
    from .cache import ActivationCache

    acts, store = {}, ActivationCache(cfg.cache_root)  # content-addressed runs under <cache root>/runs: a rerun reads them back
    for nm, ps in (("harmful", harmful), ("harmless", harmless), ("useful", useful)):
        say(f"[probekit safety] last-token activations: {nm} ({len(ps.split('train'))} training prompts)")
        acts[nm] = last_token_activations(model, tok, ps.split("train"), layers, progress=cfg.progress, cache=store,
                                          model_name=name, **kw)
    timings["activations_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs = (("harmful", "useful"), ("harmful", "harmless"), ("harmless", "useful"))
    overlap = {f"{a}_vs_{b}": activation_space_overlap(acts[a], acts[b], cfg.etas, names=(a, b)).to_dict()
               for a, b in pairs}
    # every last token is the same template token, so the uncentred sets share one dominant mean direction and
    # the uncentred MSO mostly measures that; the centred one compares how the prompts vary
    overlap_centred = {f"{a}_vs_{b}": activation_space_overlap(acts[a], acts[b], cfg.etas, centered=True,
                                                               names=(a, b)).to_dict() for a, b in pairs}
    sep = separability(acts["harmful"], acts["harmless"], seed=cfg.seed)
    timings["overlap_s"] = time.perf_counter() - t

    dirs = refusal_directions(acts["harmful"], acts["harmless"])
    lo, hi = math.ceil(cfg.select_min_frac * L), math.ceil(cfg.select_max_frac * L)
    cand = {l: dirs[l] for l in range(lo, hi, cfg.select_stride)}
    if not cand:
        raise ValueError(f"no candidate layer in [{lo}, {hi}) for a {L}-layer model; widen the select fractions.")
    t = time.perf_counter()
    sel = select_layer(model, tok, cand, harmful.split("validation")[: cfg.n_select],
                       harmless.split("validation")[: cfg.n_select],
                       config=LayerSelectionConfig(max_kl=cfg.max_kl, max_layer_frac=cfg.select_max_frac,
                                                   progress=cfg.progress, **kw))
    timings["select_layer_s"] = time.perf_counter() - t
    layer = sel.layer
    save_file({f"layer_{l}": d.contiguous() for l, d in dirs.items()}, str(out / "refusal_directions.safetensors"),
              metadata={"model": cfg.model, "chosen_layer": str(layer), "hook": "blocks.{l}.hook_resid_pre"})

    test = {"harmful": _test(harmful, cfg.n_test), "harmless": _test(harmless, cfg.n_test)}
    t = time.perf_counter()
    say(f"[probekit safety] refusal with and without the layer-{layer} direction on "
        f"{len(test['harmful'])} + {len(test['harmless'])} test prompts")
    rcfg = dict(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, progress=cfg.progress, **kw)
    refusal = evaluate_refusal(model, tok, test, dirs[layer], layer=layer,
                               config=RefusalEvalConfig(conditions=cfg.conditions, **rcfg))
    induce = None
    if cfg.actadd:
        induce = evaluate_refusal(model, tok, {"harmless": test["harmless"]}, dirs[layer], layer=layer,
                                  config=RefusalEvalConfig(conditions=("actadd", "random_actadd"), **rcfg))
    timings["refusal_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    payload = dict(
        kind="safety_activation", model=cfg.model, config=asdict(cfg), n_layers=L,
        data={"harmful": harmful.to_dict(), "harmless": harmless.to_dict(), "useful": useful.to_dict()},
        overlap=overlap, overlap_centred=overlap_centred, separability=sep.to_dict(), layer_selection=sel.to_dict(), layer=layer,
        direction_norms=[float(dirs[l].norm()) for l in layers],
        refusal=refusal.to_dict(), induce=None if induce is None else induce.to_dict(),
        directions_file="refusal_directions.safetensors", timings=timings,
    )
    _atomic_json(out / "activation.json", payload)
    write_figures_page(out / "activation.html", result_figures(payload),
                       title=f"Safety subspaces in activation space and the refusal direction — {cfg.model}")
    say(f"[probekit safety] wrote {out / 'activation.json'} and activation.html in {timings['total_s'] / 60:.1f} min")
    return payload
