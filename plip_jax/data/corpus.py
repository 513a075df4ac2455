"""Corpus files: loaders with validation (universal v2.0, legacy token positions, N=50 prompts, probe set).

Every problem is reported with the file, the sample id and what to fix; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from plip_jax.core.errors import CorpusError  # noqa: F401 (re-exported)
from plip_jax.util.resources import shipped_dir

CORPUS_DIR = shipped_dir("corpus")  # the repository's corpus/, or its copy inside an installed wheel
UNIVERSAL_GROUPS = ("python_doctest", "rust_test", "python_baseline", "rust_baseline")
# shipped prompt files of the RWKV state-steering binaries (PLIP-rs's 5 and 6 prompts)
STATE_GENERATE_PROMPTS_FILE = "state_steering_generate_prompts.json"
STATE_PERSISTENCE_PROMPTS_FILE = "state_steering_persistence_prompts.json"


def default_corpus_path(name: str = "attention_samples_universal.json") -> Path:
    """A corpus shipped in the repository's `corpus/` folder (or, when installed, the package's copy)."""
    if (CORPUS_DIR / name).is_file():
        return CORPUS_DIR / name
    raise CorpusError(f"shipped corpus {name!r} not found in {CORPUS_DIR}; pass --corpus=PATH")


@dataclasses.dataclass(frozen=True)
class UniversalSample:
    """One sample of the universal corpus: code and character positions (ASCII: = byte positions)."""

    id: str
    group: str  # one of UNIVERSAL_GROUPS
    code: str
    marker_char_pos: int
    marker_pattern: str
    target_char_positions: tuple

    @property
    def language(self) -> str:
        return "python" if self.group.startswith("python") else "rust"

    @property
    def is_baseline(self) -> bool:
        return self.group.endswith("baseline")


@dataclasses.dataclass(frozen=True)
class UniversalCorpus:
    path: Path
    format_version: str
    samples: tuple
    skipped_groups: tuple = ()  # (group, n_samples) of unknown groups skipped under allow_unknown_groups

    def group(self, name: str) -> list[UniversalSample]:
        return [s for s in self.samples if s.group == name]


def _load_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file {path} not found; pass --corpus=PATH to an existing file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path} is not valid JSON: {e}") from None


def _unknown_groups(path: Path, raw: dict, known, allow: bool) -> dict:
    """{group: n_samples} of the keys of `raw` that are neither a known group nor metadata ('_' prefix);
    CorpusError listing them and the known groups unless `allow`."""
    unknown = {k: len(v) if isinstance(v, list) else 1 for k, v in raw.items()
               if not str(k).startswith("_") and k not in known}
    if unknown and not allow:
        listed = ", ".join(f"{k!r} ({n} samples)" for k, n in unknown.items())
        raise CorpusError(f"{path}: unknown group(s) {listed}; the known groups are {', '.join(known)} "
                          f"(keys starting with '_' are metadata). Rename the group, or pass "
                          f"--allow_unknown_groups to skip it")
    return unknown


def load_universal_corpus(path: Optional[Path] = None, groups=UNIVERSAL_GROUPS,
                          allow_unknown_groups: bool = False) -> UniversalCorpus:
    """Load and validate a universal-format (v2) corpus: unique ids, positions inside the code, and the
    marker pattern present at `marker_char_pos` (else `CorpusError` naming the sample and the fix).

    A group other than UNIVERSAL_GROUPS (keys starting with '_' are metadata) is an error listing the known
    groups, unless `allow_unknown_groups`: then it is skipped and listed in `skipped_groups`. A corpus with
    no sample at all is an error."""
    path = Path(path) if path else default_corpus_path()
    raw = _load_json(path)
    if not isinstance(raw, dict) or not any(g in raw for g in groups):
        raise CorpusError(
            f"{path} has none of the groups {list(groups)}: it is not a universal-format corpus "
            f"(legacy token-position corpora are converted with `python -m bin.convert_corpus`)"
        )
    unknown = _unknown_groups(path, raw, UNIVERSAL_GROUPS, allow_unknown_groups)
    samples, seen = [], set()
    for group in groups:
        for i, item in enumerate(raw.get(group, [])):
            where = f"{path}: {group}[{i}]"
            try:
                sid, code = str(item["id"]), item["code"]
                marker, pattern = int(item["marker_char_pos"]), item["marker_pattern"]
                targets = tuple(int(t) for t in item["target_char_positions"])
            except (KeyError, TypeError, ValueError) as e:
                raise CorpusError(f"{where}: missing or malformed field {e}; each sample needs id, code, "
                                  f"marker_char_pos, marker_pattern, target_char_positions") from None
            where = f"{path}: sample {sid!r} ({group})"
            if sid in seen:
                raise CorpusError(f"{where}: duplicate id; ids must be unique across the corpus")
            seen.add(sid)
            if not 0 <= marker < len(code):
                raise CorpusError(f"{where}: marker_char_pos {marker} is outside the code (length {len(code)})")
            if code[marker:marker + len(pattern)] != pattern:
                found = code[marker:marker + len(pattern)]
                hint = code.find(pattern)
                fix = f"the pattern first occurs at {hint}" if hint >= 0 else "the pattern does not occur in the code"
                raise CorpusError(f"{where}: marker pattern {pattern!r} is not at marker_char_pos {marker} "
                                  f"(found {found!r}); {fix}: fix marker_char_pos")
            bad = [t for t in targets if not 0 <= t < len(code)]
            if bad:
                raise CorpusError(f"{where}: target_char_positions {bad} are outside the code (length {len(code)})")
            samples.append(UniversalSample(sid, group, code, marker, pattern, targets))
    if not samples:
        raise CorpusError(f"{path}: no sample in any of the groups {', '.join(groups)}; add samples")
    return UniversalCorpus(path=path, format_version=str(raw.get("_format_version", "2.0")), samples=tuple(samples),
                           skipped_groups=tuple(unknown.items()))


@dataclasses.dataclass(frozen=True)
class LegacySample:
    """Legacy PLIP-rs sample: token positions for one particular tokenizer (Qwen2.5)."""

    id: str
    group: str
    code: str
    marker_token_pos: int
    target_token_positions: tuple


_LEGACY_FIELDS = {  # group -> (marker field aliases, targets field aliases), PLIP-rs serde aliases
    "python_doctest": (("doctest_token_pos", "marker_token_pos"), ("function_param_positions", "target_token_positions")),
    "rust_test": (("test_attr_token_pos", "marker_token_pos"), ("function_token_positions", "target_token_positions")),
    "python_baseline": (("marker_token_pos", "doctest_token_pos"), ("function_param_positions", "target_token_positions")),
    "rust_baseline": (("marker_token_pos", "test_attr_token_pos"), ("struct_token_positions", "function_token_positions", "target_token_positions")),
}


def load_legacy_corpus(path: Path, allow_unknown_groups: bool = False) -> list[LegacySample]:
    """Load a legacy token-position corpus (`corpus/attention_samples.json`); unknown groups as in
    `load_universal_corpus` (an error, or skipped with `allow_unknown_groups`)."""
    raw = _load_json(path)
    if isinstance(raw, dict):
        _unknown_groups(path, raw, tuple(_LEGACY_FIELDS), allow_unknown_groups)
    out = []
    for group, (marker_keys, target_keys) in _LEGACY_FIELDS.items():
        for i, item in enumerate(raw.get(group, [])):
            marker = next((item[k] for k in marker_keys if k in item), None)
            targets = next((item[k] for k in target_keys if k in item), None)
            if marker is None or targets is None or "code" not in item:
                raise CorpusError(f"{path}: {group}[{i}] lacks code / marker / target fields "
                                  f"(expected one of {marker_keys} and {target_keys})")
            out.append(LegacySample(str(item.get("id", f"{group}_{i}")), group, item["code"], int(marker),
                                    tuple(int(t) for t in targets)))
    if not out:
        raise CorpusError(f"{path}: no samples in any of the groups {list(_LEGACY_FIELDS)}")
    return out


@dataclasses.dataclass(frozen=True)
class GenerationPrompt:
    id: str
    category: str
    prompt: str


def _prompt_records(path: Path, *, fields: str, allow_bare_list: bool = False) -> list:
    """The validated records of a prompts file (`{prompts: [{id, prompt, ...}]}`): a non-empty list of dicts,
    each with an 'id' (unique) and a string 'prompt'; else CorpusError naming the file, the entry and `fields`."""
    raw = _load_json(path)
    items = raw.get("prompts") if isinstance(raw, dict) else (raw if allow_bare_list else None)
    if not isinstance(items, list) or not items:
        raise CorpusError(f"{path}: expected a non-empty 'prompts' list of {{{fields}}}")
    seen = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "id" not in item:
            raise CorpusError(f"{path}: prompts[{i}] needs {fields} (the prompt a string)")
        if str(item["id"]) in seen:
            raise CorpusError(f"{path}: prompt {str(item['id'])!r}: duplicate id; ids must be unique")
        seen.add(str(item["id"]))
    return items


def load_generation_prompts(path: Optional[Path] = None) -> list[GenerationPrompt]:
    """The N=50 Rust completion prompts (`{prompts: [{id, category, prompt}]}`)."""
    path = Path(path) if path else default_corpus_path("generation_prompts_n50.json")
    return [GenerationPrompt(str(item["id"]), str(item.get("category", "uncategorised")), item["prompt"])
            for item in _prompt_records(path, fields="'id' and 'prompt'", allow_bare_list=True)]


@dataclasses.dataclass(frozen=True)
class ProbeSample:
    code: str
    language: str  # "python" | "rust"


def load_probe_samples(path: Optional[Path] = None) -> list[ProbeSample]:
    """The linear-probe corpus (`{samples: [{code, language}], metadata}`)."""
    path = Path(path) if path else default_corpus_path("samples.json")
    raw = _load_json(path)
    items = raw.get("samples") if isinstance(raw, dict) else None
    if not items:
        raise CorpusError(f"{path}: expected a non-empty 'samples' list of {{code, language}}")
    out = []
    for i, item in enumerate(items):
        lang = str(item.get("language", "")).lower()
        if lang not in ("python", "rust") or not item.get("code"):
            raise CorpusError(f"{path}: samples[{i}] needs code and language 'python' or 'rust' (got {lang!r})")
        out.append(ProbeSample(item["code"], lang))
    return out


def _snippet_list(path: Path, what: str) -> list:
    raw = _load_json(path)
    items = raw.get("snippets") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise CorpusError(f"{path}: expected a non-empty 'snippets' list of {what}")
    return items


def _text_field(item, key: str, where: str) -> str:
    v = item.get(key) if isinstance(item, dict) else None
    if not isinstance(v, str) or not v:
        raise CorpusError(f"{where}: field {key!r} must be a non-empty string (got {v!r})")
    return v


def _string_list(item, key: str, where: str) -> tuple:
    v = item.get(key) if isinstance(item, dict) else None
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise CorpusError(f"{where}: field {key!r} must be a non-empty list of non-empty strings (got {v!r})")
    return tuple(v)


@dataclasses.dataclass(frozen=True)
class MultiSnippet:
    """A `multi_sample_attention` snippet: the marker token contains `marker`; a token containing one of
    `names` (and shorter than 10 bytes) is a target."""

    name: str
    language: str  # "python" | "rust"
    marker: str
    names: tuple
    code: str


def load_multi_snippets(path: Optional[Path] = None) -> list[MultiSnippet]:
    """PLIP-rs's multi_sample_attention snippets (`corpus/multi_sample_snippets.json`), validated: each
    names a language python/rust, a marker and target names that occur in its code; (name, language) unique."""
    path = Path(path) if path else default_corpus_path("multi_sample_snippets.json")
    out, seen = [], set()
    for i, item in enumerate(_snippet_list(path, "{name, language, marker, names, code}")):
        where = f"{path}: snippets[{i}]"
        name, lang = _text_field(item, "name", where), _text_field(item, "language", where)
        marker, code = _text_field(item, "marker", where), _text_field(item, "code", where)
        names = _string_list(item, "names", where)
        where = f"{path}: snippet {name!r} ({lang})"
        if lang not in ("python", "rust"):
            raise CorpusError(f"{where}: language must be 'python' or 'rust'")
        if (name, lang) in seen:
            raise CorpusError(f"{where}: duplicate (name, language); make the name unique")
        seen.add((name, lang))
        if marker not in code:
            raise CorpusError(f"{where}: the marker {marker!r} does not occur in the code; fix 'marker' or 'code'")
        absent = [n for n in names if n not in code]
        if absent:
            raise CorpusError(f"{where}: names {absent} do not occur in the code; fix 'names'")
        out.append(MultiSnippet(name, lang, marker, names, code))
    return out


@dataclasses.dataclass(frozen=True)
class PatternSnippet:
    """An `attention_patterns` snippet: per query, alternative substrings (the first found in a token wins);
    the first query is the marker."""

    name: str
    language: str
    code: str
    queries: tuple  # of tuples of alternatives


def load_pattern_snippets(path: Optional[Path] = None) -> list[PatternSnippet]:
    """PLIP-rs's attention_patterns snippets (`corpus/attention_pattern_snippets.json`), validated: unique
    names, >= 1 query, each with >= 1 alternative that occurs in the code."""
    path = Path(path) if path else default_corpus_path("attention_pattern_snippets.json")
    out, seen = [], set()
    for i, item in enumerate(_snippet_list(path, "{name, language, code, queries}")):
        where = f"{path}: snippets[{i}]"
        name, lang, code = (_text_field(item, k, where) for k in ("name", "language", "code"))
        where = f"{path}: snippet {name!r}"
        if name in seen:
            raise CorpusError(f"{where}: duplicate name")
        seen.add(name)
        queries = item.get("queries")
        if not isinstance(queries, list) or not queries:
            raise CorpusError(f"{where}: 'queries' must be a non-empty list of lists of patterns")
        alts = tuple(_string_list({"q": q}, "q", f"{where}: queries[{j}]") for j, q in enumerate(queries))
        for j, a in enumerate(alts):
            if not any(x in code for x in a):
                raise CorpusError(f"{where}: none of queries[{j}] = {list(a)} occurs in the code")
        out.append(PatternSnippet(name, lang, code, alts))
    return out


STATE_PROMPT_CATEGORIES = {"python_doctest": ">>>", "rust_test": "#[test]"}  # category -> marker text
STATE_PROMPT_DISTANCES = ("close", "medium", "far")


@dataclasses.dataclass(frozen=True)
class StatePrompt:
    """A prompt of the RWKV-6 state-steered generation tools: code ending inside the function to complete,
    with a test marker (`>>>` or `#[test]`) earlier in it. `distance` (persistence prompts only): the
    padding between the marker's example and that function, "close" | "medium" | "far" ("" if none)."""

    id: str
    category: str  # "python_doctest" | "rust_test"
    prompt: str
    distance: str = ""

    @property
    def language(self) -> str:
        return "python" if self.category == "python_doctest" else "rust"

    @property
    def marker(self) -> str:
        return STATE_PROMPT_CATEGORIES[self.category]


def load_state_prompts(path: Path, *, need_distance: bool = False) -> list[StatePrompt]:
    """State-steering prompts (`{prompts: [{id, category, prompt, distance?}]}`, e.g.
    corpus/state_steering_generate_prompts.json): unique ids, category python_doctest or rust_test, the
    category's marker in the prompt, and (need_distance) a distance close/medium/far; else CorpusError."""
    path = Path(path)
    out = []
    for item in _prompt_records(path, fields="'id', 'category' and 'prompt'"):
        p = StatePrompt(str(item["id"]), str(item.get("category", "")), item["prompt"], str(item.get("distance", "")))
        where = f"{path}: prompt {p.id!r}"
        if p.category not in STATE_PROMPT_CATEGORIES:
            raise CorpusError(f"{where}: category {p.category!r} must be one of {sorted(STATE_PROMPT_CATEGORIES)}")
        if p.marker not in p.prompt:
            raise CorpusError(f"{where}: no {p.marker!r} marker in the prompt ({p.category} prompts need one)")
        if need_distance and p.distance not in STATE_PROMPT_DISTANCES:
            raise CorpusError(f"{where}: distance {p.distance!r} must be one of {list(STATE_PROMPT_DISTANCES)}")
        out.append(p)
    return out
