"""Loading a config: YAML and ``section.key=value`` overrides, each section validated on its own, then the
checks (``checks``); every problem is raised together as one ``ConfigError``, before Ray starts."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from raytrain.checks import cross_problems, environment_problems
from raytrain.config import LENGTHS_KEYS, SECTIONS, Config
from raytrain.lengths import SCHEDULES, Lengths, readers
from raytrain.section import ConfigError, Problem, Section


def read_yaml(path: str, what: str = "config file") -> dict:
    """A YAML mapping from ``path``; a file that cannot be read or parsed is a ConfigError naming line and column."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError([("-c", path, f"cannot read the {what}: {err.strerror}")]) from None
    except yaml.YAMLError as err:
        raise ConfigError([("-c", path, f"not valid YAML: {yaml_reason(err)}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([("-c", path, f"the {what} must be a mapping of sections")])
    return raw


def yaml_reason(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + str(getattr(err, "problem", None) or err)


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Set ``section.key=value`` items (values parsed as YAML) in ``raw``; return problems."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((item, None, "overrides are written section.key=value"))
            continue
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            problems.append((key, text, f"the value does not parse as YAML ({yaml_reason(err)}); quote it"))
            continue
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append((key, text, f"'{part}' is not a section"))
                break
        else:
            node[leaf] = value
    return problems


def unknown_key(names, bad: str) -> str:
    close = difflib.get_close_matches(bad, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {hint}valid keys: {', '.join(names)}"


def validate_section(cls: type[Section], value: Any, prefix: str, names=None) -> tuple[Section, list[Problem]]:
    """One section, validated: each bad key is reported and left at its default, so the cross-key checks still
    run on the rest (one mistake never hides another)."""
    if value is None:
        value = {}
    if isinstance(value, cls):
        return value, []
    if not isinstance(value, dict):
        return cls(), [(prefix, value, f"must be a mapping of keys ({', '.join(cls.model_fields)})")]
    try:
        return cls.model_validate(value), []
    except ValidationError as err:
        problems, bad = [], set()
        for e in err.errors():
            bad.add(e["loc"][0])
            key = ".".join([prefix, *map(str, e["loc"])]).lstrip(".")
            if e["type"] == "extra_forbidden":
                problems.append((key, e["input"], unknown_key(names or list(cls.model_fields), str(e["loc"][-1]))))
            else:
                problems.append((key, e.get("input"), e["msg"].removeprefix("Value error, ")))
        return cls.model_validate({k: v for k, v in value.items() if k not in bad}), problems


def validate_lengths(value: Any) -> tuple[Lengths, list[Problem]]:
    """The chosen schedule's model; keys it does not read are refused, naming the schedules that read them."""
    if not isinstance(value, dict):
        return validate_section(Lengths, value, "lengths")
    name, problems = value.get("schedule", "uniform"), []
    cls = SCHEDULES.get(name)
    if cls is None:  # still check the keys every schedule reads
        problems.append(("lengths.schedule", name, f"unknown schedule; choose one of {sorted(SCHEDULES)}"))
        cls, value = Lengths, {k: v for k, v in value.items() if k in Lengths.model_fields and k != "schedule"}
    foreign = [k for k in value if k not in cls.model_fields and readers(k)]
    for key in foreign:
        names = readers(key)
        problems.append((f"lengths.{key}", value[key], f"the {name} schedule does not read it ("
                         f"{', '.join(names)} {'reads' if len(names) == 1 else 'read'} it); remove it or choose "
                         f"{'that schedule' if len(names) == 1 else 'one of those schedules'}"))
    parsed, more = validate_section(cls, {k: v for k, v in value.items() if k not in foreign}, "lengths",
                                    LENGTHS_KEYS)
    return parsed, problems + more


def schema_problems(raw: dict) -> tuple[dict, list[Problem]]:
    """Each section validated on its own, so one bad section does not hide another's problems."""
    parsed, problems = {}, []
    for top, value in raw.items():
        if top not in Config.model_fields:
            problems.append((top, value, unknown_key(list(Config.model_fields), top)))
    for name in Config.model_fields:
        value = raw.get(name)
        if name == "tokenizer":
            parsed[name] = value if isinstance(value, str) and value else "bytes"
            if value is not None and not isinstance(value, str):
                problems.append((name, value, "must be 'bytes' or a local Hugging Face tokenizer directory"))
            continue
        parsed[name], found = validate_lengths(value or {}) if name == "lengths" else \
            validate_section(SECTIONS[name], value, name)
        problems += found
    return parsed, problems


def load_config(path: Optional[str] = None, overrides: list[str] = (), environment: bool = True,
                only: Optional[tuple[str, ...]] = None, adapt_lengths: bool = False) -> Config:
    """Load YAML (if given), apply overrides and validate; raise ConfigError with every problem.

    ``environment=False`` skips the checks against this machine (paths, CPUs,
    GPUs, the tokenizer and pretrained model): for configs meant for a cluster.
    ``only`` reads just those top-level keys of the file, for commands that need
    one section. ``adapt_lengths`` drops the lengths keys the chosen schedule does
    not read instead of refusing them (tune trials that switch the schedule).
    """
    raw = read_yaml(path) if path is not None else {}
    problems = apply_overrides(raw, list(overrides))
    if only:
        problems += [(key, raw[key], f"this command reads only {', '.join(only)}") for key in raw
                     if key not in only and key in Config.model_fields and any(o.startswith(key) for o in overrides)]
        raw = {key: value for key, value in raw.items() if key in only or key not in Config.model_fields}
    lengths = raw.get("lengths")
    if adapt_lengths and isinstance(lengths, dict) and lengths.get("schedule", "uniform") in SCHEDULES:
        reads = SCHEDULES[lengths.get("schedule", "uniform")].model_fields
        raw["lengths"] = {k: v for k, v in lengths.items() if k in reads or not readers(k)}
    parsed, schema = schema_problems(raw)
    problems += schema + cross_problems(parsed)
    if environment:
        problems += environment_problems(parsed)
    if problems:
        raise ConfigError(unique(problems))
    return Config(**parsed)


def unique(problems: list[Problem]) -> list[Problem]:
    seen, kept = set(), []
    for key, value, fix in problems:
        if (key, repr(value), fix) not in seen:
            seen.add((key, repr(value), fix))
            kept.append((key, value, fix))
    return kept
