"""`--sglang-*` flags passed straight through to SGLang's `ServerArgs`, plus SGLang version helpers.

With sglang importable, `add_sglang_args` copies every option of `ServerArgs.add_cli_args` under the prefix
`--sglang-` (same types, choices and store-true semantics), and gives the `ServerArgs` fields that have no CLI
option a generic `--sglang-FIELD VALUE`. Without sglang (CPU boxes), nothing is added and the flags arrive as the
`parse_known_args` remainder; `sglang_kwargs_from_args` then parses `--sglang-KEY VALUE` pairs generically, so the
same command line works on both. Either way the result is a dict of `ServerArgs` kwargs (`sglang.Engine(**kw)`).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import re
from collections.abc import Sequence

PREFIX = "--sglang-"
DEST = "sgl__"  # namespace dest prefix; distinct from the project's own --sglang-server-url / --sglang-router-url


def import_sglang():
    """The installed sglang package; ImportError when missing. A bare `sglang/` folder on sys.path (e.g. the
    repo's tests/sglang/ under pytest) imports as an empty namespace package and is not mistaken for it."""
    import sglang

    if getattr(sglang, "__file__", None) is None:
        raise ImportError(f"'sglang' resolves to a namespace folder {list(sglang.__path__)}, not the SGLang package")
    return sglang


def sglang_available() -> bool:
    try:
        import_sglang()
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libs) raises more than ImportError
        return False
    return True


def parse_version(text: str) -> tuple[int, ...]:
    """'0.5.21.post1' / '0.5.23rc0' -> (0, 5, 21); unparsable parts stop the tuple."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


def installed_version() -> tuple[int, ...] | None:
    try:
        sglang = import_sglang()
    except Exception:  # noqa: BLE001 - see sglang_available
        return None
    return parse_version(getattr(sglang, "__version__", "0"))


def _server_args_class():
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


def server_args_fields(cls=None) -> dict[str, object]:
    """Field name -> default of `ServerArgs` (a dataclass up to 0.5.22, a msgspec Struct in 0.5.23)."""
    cls = cls or _server_args_class()
    if dataclasses.is_dataclass(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
        return out
    names = getattr(cls, "__struct_fields__", None)
    if names is None:
        raise TypeError(f"{cls!r}: neither a dataclass nor a msgspec Struct")
    defaults = getattr(cls, "__struct_defaults__", ())
    pad = (None,) * (len(names) - len(defaults))
    return {n: _msgspec_default(d) for n, d in zip(names, pad + tuple(defaults), strict=True)}


def _msgspec_default(d):
    import msgspec

    if d is msgspec.NODEFAULT:
        return None
    factory = getattr(d, "factory", None)  # msgspec.field(default_factory=...)
    return factory() if callable(factory) else d


def parse_value(text: str):
    """A generic flag value: Python/JSON literal (int, float, list, dict, bool) or else the plain string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _generic_type(default):
    if isinstance(default, bool):
        return {"type": parse_value, "nargs": "?", "const": True}
    if isinstance(default, (int, float)):
        return {"type": type(default)}
    if isinstance(default, (list, tuple)):
        return {"type": parse_value, "nargs": "*"}
    return {"type": parse_value}


def add_sglang_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--sglang-<server-arg>` for every SGLang `ServerArgs` field (nothing when sglang isn't importable).

    Values land in `args.sgl__<field>` only when given on the command line (default SUPPRESS), so SGLang's own
    defaults stay in charge of everything not set.
    """
    if not sglang_available():
        return parser
    cls = _server_args_class()
    fields = server_args_fields(cls)
    group = parser.add_argument_group(
        "SGLang server args (passed through)",
        "every sglang ServerArgs option as --sglang-<option>, e.g. --sglang-mem-fraction-static 0.6")
    taken = {s for a in parser._actions for s in a.option_strings}
    tmp = argparse.ArgumentParser(add_help=False)
    cls.add_cli_args(tmp)
    covered = set()
    for action in tmp._actions:
        if not action.option_strings or action.dest not in fields:
            continue
        opts = [PREFIX + s[2:] for s in action.option_strings if s.startswith("--")]
        opts = [s for s in opts if s not in taken]
        if not opts:
            continue
        new = copy.copy(action)
        new.option_strings, new.dest, new.default, new.required = opts, DEST + action.dest, argparse.SUPPRESS, False
        group._add_action(new)
        taken.update(opts)
        covered.add(action.dest)
    for name, default in fields.items():
        flag = PREFIX + name.replace("_", "-")
        if name in covered or name.startswith("_") or flag in taken:
            continue
        group.add_argument(flag, dest=DEST + name, default=argparse.SUPPRESS, metavar="V",
                           help=argparse.SUPPRESS, **_generic_type(default))
    return parser


def parse_sglang_argv(argv: Sequence[str]) -> dict:
    """Generic `--sglang-KEY VALUE` / `--sglang-KEY=VALUE` / bare `--sglang-FLAG` (-> True) pairs -> kwargs.

    Several values after one key make a list. Raises ValueError on anything that isn't a `--sglang-` flag.
    """
    out: dict = {}
    key, vals = None, []

    def flush():
        if key is not None:
            out[key] = True if not vals else (vals[0] if len(vals) == 1 else vals)

    for tok in argv:
        if tok.startswith(PREFIX):
            flush()
            name, eq, value = tok[len(PREFIX):].partition("=")
            if not name:
                raise ValueError(f"bad SGLang flag {tok!r}")
            key, vals = name.replace("-", "_"), ([parse_value(value)] if eq else [])
        elif tok.startswith("--"):
            raise ValueError(f"unrecognized argument {tok!r} (only --sglang-* flags pass through to SGLang)")
        elif key is None:
            raise ValueError(f"value {tok!r} given before any --sglang-* flag")
        else:
            vals.append(parse_value(tok))
    flush()
    return out


def sglang_kwargs_from_args(args: argparse.Namespace, extra_argv: Sequence[str] | None = None) -> dict:
    """`ServerArgs` kwargs from the parsed flags (`add_sglang_args`) and/or a `--sglang-*` argv remainder.

    `extra_argv` defaults to `args.sglang_extra` when present (the CLI keeps the remainder there). With sglang
    importable, generic keys are checked against the `ServerArgs` fields so a typo fails here, not in a child.
    """
    out = {k[len(DEST):]: v for k, v in vars(args).items() if k.startswith(DEST)}
    if extra_argv is None:
        extra_argv = getattr(args, "sglang_extra", None) or []
    generic = parse_sglang_argv(extra_argv)
    if generic and sglang_available():
        known = server_args_fields()
        unknown = sorted(set(generic) - set(known))
        if unknown:
            raise ValueError(f"unknown SGLang server args: {', '.join(PREFIX + u.replace('_', '-') for u in unknown)}")
    out.update(generic)
    return out


def server_cli_argv(kwargs: dict) -> list[str]:
    """`ServerArgs` kwargs -> `python -m sglang.launch_server` flags (bools as bare flags when True)."""
    argv = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            import json

            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv
