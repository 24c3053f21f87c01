"""The error contract of every command-line entry point (mva-synth, mva-build, mva-train, mva-infer):
bad input ends in ONE line ``<prog>: error: <message>`` on stderr and exit status 2, not a traceback.
Only the errors an entry point names are caught: anything else is a bug and keeps its traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_line_errors(prog: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except errors as exc:
        # one write() of the whole line: torchrun starts ranks with `python -u` (stderr unbuffered), where print()
        # writes the message and its newline separately and two ranks' lines came out as one (CI, 2 ranks)
        line = f"{prog}: error: {exc}\n"
        sys.stderr.flush()  # what was written before stays before
        try:
            os.write(sys.stderr.fileno(), line.encode())
        except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (captured in-process)
            sys.stderr.write(line)
            sys.stderr.flush()
        sys.exit(2)


def omp_threads(value: str | None) -> int:
    """Torch threads for ``OMP_NUM_THREADS`` as OpenMP reads it: the first level of a nested list ("2,1");
    1 (the CLIs' default) where it is empty or not a positive number (``int()`` of those crashed the CLIs)."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else 1


def check_overrides(prog: str, schema: type, conf_dir: str | os.PathLike | None = None,
                    added: tuple[str, ...] = (), argv: list[str] | None = None) -> None:
    """Refuse, before Hydra composes, a command-line override that names a key ``schema`` lacks or an option
    of a config group (a folder ``conf_dir/<group>/`` of ``<option>.yaml``; none without ``conf_dir``) that
    does not exist: one line, exit 2. Hydra's own message for these (``data.batchsize=64`` without ``+``,
    ``+experiment=nope``, ``data=5``) is several lines and exit 1, repeated by every rank under torchrun.
    ``added``: the groups outside the primary config's defaults list, which take a ``+`` (``+experiment=demo``).
    Anything this cannot read is left to Hydra."""
    import difflib
    from pathlib import Path

    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args, rest = get_args_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
        texts = [*(args.overrides or []), *(a for a in rest if not a.startswith("-"))]
        overrides = OverridesParser.create().parse_overrides(texts)
    except Exception:  # noqa: BLE001 - a malformed line: Hydra says what is wrong with it
        return
    from data.typed_config import has_key, mapping_refusal, schema_keys

    groups = {p.name for p in Path(conf_dir).iterdir() if p.is_dir()} if conf_dir else set()
    with one_line_errors(prog, (ValueError,)):
        for o in overrides:
            key = o.key_or_group
            if o.is_delete() or key == "hydra" or key.startswith(("hydra.", "hydra/")):
                continue
            if key in groups:
                options = sorted(p.stem for p in Path(conf_dir).joinpath(key).glob("*.yaml"))
                try:
                    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else \
                        [o.get_value_element_as_str()]
                except Exception:  # noqa: BLE001 - glob(...) sweeps need Hydra's config loader: Hydra checks them
                    values = []
                for v in values:
                    if v not in options:
                        raise ValueError(f"{o.input_line}: {key} has no option {v!r}; choose one of {options}")
                if key in added and not (o.is_add() or o.is_force_add()):
                    raise ValueError(f"{o.input_line}: {key} is not in the default config; add it: +{o.input_line}")
                continue
            if not has_key(schema, key):
                near = difflib.get_close_matches(key, schema_keys(schema), n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ValueError(f"unknown config key: {key}{hint}")
            # a mapping cannot merge into a list or a plain value: Hydra's message is several lines, exit 1. (Not
            # '+key=' on a key the config has: Hydra takes it where the value is null or ??? or the new one a list)
            if not o.is_sweep_override() and isinstance(o.value(), dict):
                why = mapping_refusal(schema, key, o.input_line.split("=", 1)[1])
                if why:
                    raise ValueError(f"{o.input_line}: {why}")
