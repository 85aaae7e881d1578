"""Loading and validating `params.yaml` sections, shared by every component.

Each stage declares a frozen pydantic model for its own section(s). `load_section`
reads only those sections, refuses unknown keys, wrong types and impossible values
with a `ParamsError` that names the key (``download.fractions.train``) and what is
allowed, before the stage does any work. `write_resolved` stores the resolved
config next to the stage's outputs.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import pydantic
import yaml

log = logging.getLogger(__name__)

RESOLVED_PARAMS_FILE = "params.json"


def did_you_mean(word: str, choices, n: int = 3, cutoff: float = 0.6) -> str:
    """' (did you mean a, b?)' with the closest of `choices` to a mistyped `word`, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class ParamsError(ValueError):
    """A params.yaml section is missing, mistyped or impossible."""


class Section(pydantic.BaseModel):
    """Base for every params section: frozen, strict, no unknown keys."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)


SectionT = TypeVar("SectionT", bound=Section)


class CommonParams(Section):
    """The `common` section, read by every stage that draws random numbers."""

    seed: int = pydantic.Field(1337, ge=0, lt=2**32)  # what Keras and NumPy take; -1 failed in train_head, late


class TtaParams(Section):
    """The `tta` section: test-time augmentation of the fine-tuned model, read by evaluate (which scores it)
    and export (which serves it), so the served model is the one evaluated."""

    # none | horizontal | vertical | both: average the probabilities of the image and of its mirror images
    # (both: left-right, top-bottom and the two together, a half turn)
    flip: Literal["none", "horizontal", "vertical", "both"] = "none"
    # also average over each of those views turned a quarter (square inputs): with flip: both, all 8
    # symmetries of a square (every quarter turn, mirrored or not), for images without an up; with none,
    # the image and its quarter turn only
    quarter_turns: bool = False


def _describe_error(prefix: str, error: Mapping[str, Any], model: type[Section]) -> str:
    loc = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{loc}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    got = error.get("input")
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{loc}: {message} (got {got!r})"


def _allowed_keys(model: type[Section], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc` inside `model`, following nested sections."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = _section_type(fields[part].annotation)
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _section_type(annotation: Any) -> Any:
    """The Section subclass inside an annotation such as `Foo | None`."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def parse_section(model: type[SectionT], name: str, raw: Any) -> SectionT:
    """Validate one section's raw mapping into `model`; errors name `name.key`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{name}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return model.model_validate(dict(raw))
    except pydantic.ValidationError as exc:
        lines = [_describe_error(name, err, model) for err in exc.errors()]
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines)) from None


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers and bools as YAML 1.2 does, as DVC (ruamel) reads params.yaml.

    PyYAML follows YAML 1.1, where `1e-05` (no dot) is a string; DVC writes
    `dvc exp run -S train_head.learning_rate=0.00001` into params.yaml exactly
    so, and reads it back as a float itself. YAML 1.1 also reads `yes`, `no`, `on`
    and `off` as bools, `010` as 8 and `1:30` as 90 (base 60), which DVC (and `dvc params diff`)
    reads as strings, 10 and the string '1:30': here only `true` and `false` are bools, a leading
    zero is decimal, `0o10` octal, nothing is base 60, and a key given twice in one mapping is an error
    (DVC refuses such a file; PyYAML took the last), so a stage never sees another value than DVC shows.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ParamsError(
                        f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: a key given twice in one "
                        "mapping (DVC refuses such a file; one of the values would be dropped without a word)"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ParamsLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# ruamel's YAML 1.2 resolvers (its float's third form wants a signed exponent: `.5e1` is a string)
# int: binary, octal (0o, or a leading 0 that its constructor reads as decimal), decimal, hex
_ParamsLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_ParamsLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 int as ruamel reads it: `0o` octal, `0x` hex, `0b` binary, and decimal otherwise (`010` is 10)."""
    raw = str(loader.construct_scalar(node))
    text = raw.replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    try:
        for prefix, base in (("0b", 2), ("0o", 8), ("0x", 16)):
            if digits.startswith(prefix):
                return sign * int(digits[2:], base)
        return sign * int(digits)
    except ValueError:  # `-_`, `0x_`: the resolver's pattern takes them, no number is there (DVC refuses them too)
        raise ParamsError(f"{raw!r} at line {node.start_mark.line + 1}: not a number") from None


_ParamsLoader.add_constructor(_INT, _construct_int)


class _ParamsDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string `load_yaml` (YAML 1.2, as DVC) would read as another type:
    PyYAML quotes by YAML 1.1's rules, so it wrote `0o10`, `0009` or an all-digit id unquoted, which came back
    as numbers."""


_ParamsDumper.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in _ParamsLoader.yaml_implicit_resolvers.items()
}


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `load_yaml` and DVC read back as `data` (keys in their order, non-ASCII kept)."""
    return yaml.dump(data, Dumper=_ParamsDumper, sort_keys=False, allow_unicode=True)


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down, keys in the same order (in Python 1 == 1.0 == True; in a
    params file they are three values, and DVC's `params diff` shows a change between them)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [(type(key), key) for key in a]  # keys too: `1:`, `true:` and `1.0:` are three keys
        return keys == [(type(key), key) for key in b] and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))  # NaN is NaN


def _apply(doc: Any, old: Mapping, new: Mapping) -> None:
    """Make ruamel's round-trip mapping `doc` (which reads as `old`) read as `new`, touching only what differs:
    the comments and layout of every unchanged key stay, and so do a changed key's own comments."""
    for key in [key for key in doc if key not in new]:
        del doc[key]
    for key, value in new.items():
        if key in old and same(old[key], value):
            continue
        before = old.get(key)
        in_place_order = isinstance(before, Mapping) and [
            *(k for k in before if k in value),
            *(k for k in value if k not in before),
        ]
        if isinstance(value, Mapping) and list(value) == in_place_order:
            _apply(doc[key], before, value)  # what an edit in place gives: kept keys in order, new ones after
        elif isinstance(before, list) and isinstance(value, list) and same(before, value[: len(before)]):
            doc[key].extend(value[len(before) :])  # items added after the kept ones: their comments stay
        else:
            doc[key] = _in_style_of(doc.get(key), value)


def _in_style_of(node: Any, value: Any) -> Any:
    """`value` in the flow style (`[160, 160]`, `{a: 1}`) of the round-trip node it replaces, if that had it."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    flow = getattr(getattr(node, "fa", None), "flow_style", lambda: False)()
    if flow and isinstance(value, list):
        value = CommentedSeq(value)
    elif flow and isinstance(value, Mapping):
        value = CommentedMap(value)
    else:
        return value
    value.fa.set_flow_style()
    return value


def write_params(path: str | Path, data: Mapping[str, Any]) -> bool:
    """Write `data` into the params file `path`, changing only the values that differ from what it holds, so its
    comments and layout stay (ruamel.yaml's round trip, the YAML 1.2 reader and writer DVC edits params.yaml with
    for `dvc exp run -S`; `null` stays `null`, long lines unwrapped, quotes as they were). The result must read
    back, by `load_yaml`, as exactly `data`; where it does not (or the file is not one ruamel reads), the whole
    file is written by `dump_yaml` instead, without its comments, with a warning. Returns whether the comments
    were kept."""
    import io

    import ruamel.yaml
    import ruamel.yaml.representer

    path = Path(path)
    text = path.read_text(encoding="utf-8")

    class Representer(ruamel.yaml.representer.RoundTripRepresenter):
        """ruamel's round-trip writer, `null` written as `null` (its own writes nothing): on a subclass, so DVC's
        writer in this process is not changed."""

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    rt = ruamel.yaml.YAML()
    rt.Representer = Representer
    rt.width = 1 << 16
    rt.preserve_quotes = True
    try:
        doc, old = rt.load(text), load_yaml(text)
        if not isinstance(doc, Mapping) or not isinstance(old, Mapping):
            raise ValueError("not a mapping")
        _apply(doc, old, data)
        out = io.StringIO()
        rt.dump(doc, out)
        written = out.getvalue()
        kept = same(load_yaml(written), dict(data))
    except (ruamel.yaml.YAMLError, ParamsError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("%s: cannot edit it in place (%s)", path, exc)
        kept = False
    if not kept:
        log.warning("%s: rewritten whole, without its comments", path)
        written = dump_yaml(dict(data))
    path.write_text(written, encoding="utf-8")
    return kept


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def read_params(params_path: str | Path) -> dict[str, Any]:
    path = Path(params_path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:  # a syntax error: the file and the place, not a parser's traceback
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at top level")
    unknown = sorted(str(name) for name in data if name not in SECTIONS)
    if unknown:  # no stage reads it: `dvc exp run -S +train_heads.epochs=5` trained with train_head's 30 epochs
        raise ParamsError(
            f"{path}: unknown section {unknown[0]!r}{did_you_mean(unknown[0], SECTIONS, n=1, cutoff=0.7)}; "
            f"the sections are {', '.join(sorted(SECTIONS))}"
        )
    return data


# Every top-level section a stage or tool reads (params.yaml's): another is a typo no stage would ever read.
SECTIONS = frozenset(
    {
        "common",
        "dataset",
        "download",
        "convert",
        "conv_base",
        "beam",
        "extract",
        "train_head",
        "quality",
        "finetune",
        "evaluate",
        "tta",
        "export",
        "retrain",
    }
)


def section(data: Mapping[str, Any], model: type[SectionT], name: str, params_path: str | Path) -> SectionT:
    """Section `name` of a params file, validated and complete.

    A stage never runs on the code's defaults: a missing section (a misspelt
    ``train-head:`` would otherwise train with them) and a missing key are
    errors. Hyper-parameters live in params.yaml; the models' defaults serve
    code that builds params itself (tests, benchmarks) and equal params.yaml's
    values (tests/components/test_params.py).
    """
    if name not in data:
        raise ParamsError(f"{params_path}: section {name!r} is missing{did_you_mean(name, data, n=1, cutoff=0.7)}")
    parsed = parse_section(model, name, data[name])
    missing = missing_keys(model, data[name] or {}, name)
    if missing:
        raise ParamsError(
            f"{params_path}: {', '.join(missing)}: missing; a stage takes every hyper-parameter from the "
            "params file, never from code defaults (see the repository's params.yaml for each key)"
        )
    return parsed


def missing_keys(model: type[Section], raw: Mapping[str, Any], prefix: str) -> list[str]:
    """Dotted keys of `model` (nested sections included) that `raw` lacks."""
    missing = []
    for key, field in model.model_fields.items():
        if key not in raw:
            missing.append(f"{prefix}.{key}")
            continue
        nested = _section_type(field.annotation)
        if nested is not None and isinstance(raw[key], Mapping):
            missing += missing_keys(nested, raw[key], f"{prefix}.{key}")
    return missing


def load_section(params_path: str | Path, model: type[SectionT], name: str) -> SectionT:
    """Read `name` from the params file and validate it as `model`."""
    return section(read_params(params_path), model, name, params_path)


def to_jsonable(config: pydantic.BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def write_resolved(out_dir: str | Path, sections: Mapping[str, pydantic.BaseModel]) -> Path:
    """Write the resolved config of a stage (all sections it read) as JSON."""
    path = Path(out_dir) / RESOLVED_PARAMS_FILE
    path.write_text(resolved_text(sections), encoding="utf-8")
    return path


def resolved_text(sections: Mapping[str, pydantic.BaseModel]) -> str:
    """The text of a stage's resolved-params file (`write_resolved`)."""
    payload = {name: to_jsonable(section) for name, section in sections.items()}
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def log_resolved(stage: str, sections: Mapping[str, pydantic.BaseModel]) -> None:
    payload = {name: to_jsonable(section) for name, section in sections.items()}
    log.info("%s resolved params: %s", stage, json.dumps(payload, sort_keys=True))
