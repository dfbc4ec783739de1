"""User errors on the command line: one line naming the problem and what to do, an exit code
of 1 (bad input data, missing files) or 2 (bad arguments or parameters), no traceback.

Every entry point a user types (``perception2d COMMAND``, ``perception2d bringup``,
``make demo``) runs its work through :func:`run_main`. A traceback is shown only with
``--debug`` or ``PERCEPTION2D_DEBUG=1``; an exception that is not a known user error is a bug
and keeps its traceback.

The checks shared by ``process``, ``bringup`` and ``make demo`` live here too, so the three
report the same mistake with the same line: :func:`load_params` (params file → validated
pipeline config), :func:`check_input_bag` and :func:`check_output_path`.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

DEBUG_ENV = "PERCEPTION2D_DEBUG"

# (module, class) of exceptions that are user errors: a model or file the user named is
# missing or broken, a backend/device they asked for is not here. Looked up only in modules
# already imported (an exception cannot come from a module that was never loaded).
_USER_ERROR_CLASSES = (
    ("perception2d_ros.engines.model_store", "ModelFileError", 1),
    ("perception2d_ros.engines.base", "EngineError", 1),   # incl. BackendUnavailable
    ("perception2d_ros.models.sam.spec", "SamError", 1),             # incl. SamWeightsMissing
    ("perception2d_ros.pipeline.frame", "StageUnavailable", 1),
    ("perception2d_ros.engines.fetch", "FetchError", 1),
    ("perception2d_ros.models.clip.checkpoint", "CheckpointError", 1),
    ("perception2d_ros.models.clip.resolve", "ClipModelUnavailable", 1),
    ("perception2d_ros.models.lseg.checkpoint", "CheckpointError", 1),
    ("perception2d_ros.cli.label", "LabelError", 1),
    ("perception2d_ros.models.lseg.resolve", "SegLabelsError", 1),
)
# file-system mistakes about paths the user gave (a wrong path, an existing output)
_OS_USER_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                   PermissionError)


class UserError(Exception):
    """A mistake the user can fix. ``str(exc)`` is the whole message (problem + what to do);
    ``code`` the exit code (1: input data / files, 2: arguments / parameters)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def debug_enabled(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``PERCEPTION2D_DEBUG`` set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    return bool(argv) and "--debug" in _before_ros_args(argv)


def strip_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug`` (accepted anywhere before ``--ros-args``)."""
    head = _before_ros_args(argv)
    return [a for a in head if a != "--debug"] + argv[len(head):]


def _before_ros_args(argv: list[str]) -> list[str]:
    return argv[:argv.index("--ros-args")] if "--ros-args" in argv else list(argv)


def user_error_code(exc: BaseException) -> int | None:
    """The exit code for ``exc`` if it is a user error, else None (a bug: keep the traceback)."""
    if isinstance(exc, UserError):
        return exc.code
    if isinstance(exc, _OS_USER_ERRORS):
        return 1
    for module_name, cls_name, code in _USER_ERROR_CLASSES:
        module = sys.modules.get(module_name)
        cls = getattr(module, cls_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return code
    return None


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (OS errors: the reason and the path)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}; check the path"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def report(prog: str, message: str) -> None:
    """Print the one error line (flushing stdout first so the order reads right)."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def run_main(func: Callable[[], Any], *, prog: str, debug: bool = False) -> int:
    """Run ``func`` (returning an exit code) the way every entry point should: user errors →
    one line + their exit code; Ctrl-C → 130; a closed stdout pipe (``| head``) → 141, quietly.
    """
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141  # as a tool killed by SIGPIPE; nothing to report, the reader went away
    except SystemExit as exc:  # a `raise SystemExit("message")` inside a command
        if isinstance(exc.code, str):
            if debug:
                traceback.print_exc()
            report(prog, one_line(Exception(exc.code)))
            return 1
        raise
    except Exception as exc:  # noqa: BLE001 - sorted into user error vs bug below
        code = user_error_code(exc)
        if code is None:
            raise
        if debug:
            traceback.print_exc()
        report(prog, one_line(exc))
        return code


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- shared checks
def load_params(params_file: str | Path | None, node: str = "pipeline_node",
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The validated pipeline config a node named ``node`` gets from ``params_file`` (default:
    the package's config/perception2d.yaml), with ``overrides`` applied on top. Every problem
    is a :class:`UserError` naming the file and the parameter."""
    import yaml

    from perception2d_ros.ros.bringup import default_params_file, pipeline_config
    from perception2d_ros.engines.model_params import check_engine_params, confine_model_params
    from perception2d_ros.pipeline.config import validate_config

    path = Path(params_file) if params_file else default_params_file()
    if not path.is_file():
        raise UserError(f"params file {path} not found"
                        + (" (it is a directory)" if path.is_dir() else "")
                        + "; pass an existing YAML with --params-file (the default is "
                        "config/perception2d.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        why = (f"line {mark.line + 1}: {getattr(exc, 'problem', '')}" if mark is not None
               else one_line(exc))
        raise UserError(f"params file {path} is not valid YAML ({why}); fix it or start "
                        "from config/perception2d.yaml") from exc
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("ros__parameters", {}), dict)
            for v in data.values()):
        raise UserError(f"params file {path} is not a ROS 2 params file (expected "
                        "'NODE_NAME: {ros__parameters: {...}}' or '/**: ...'); see "
                        "config/perception2d.yaml")
    try:
        cfg = pipeline_config(path, node=node)
        for key, value in (overrides or {}).items():
            cfg[key] = value
        validate_config(cfg)
        check_engine_params(cfg)
        confine_model_params(cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: {one_line(exc)}") from exc
    return cfg


def check_input_bag(path: str | Path) -> None:
    """Fail with one line unless ``path`` is a bag that opens (before any model is loaded)."""
    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.io.bag_types import find_interface_dirs

    p = Path(path)
    if not p.exists():
        raise UserError(f"bag {p} does not exist; check the path (a .mcap, .db3 or rosbag2 "
                        "directory)", 1)
    if p.is_file() and p.stat().st_size == 0:
        raise UserError(f"bag {p} is empty (0 bytes); record it again or pick another", 1)
    try:
        with BagReader(p, msg_dirs=find_interface_dirs()):
            pass
    except (ValueError, OSError) as exc:
        reason = one_line(exc.__cause__ or exc)
        raise UserError(f"cannot read bag {p} ({reason.rstrip('.')}): it is truncated or not "
                        "a rosbag2 bag; record it again (the mcap CLI's `mcap recover` can "
                        "often salvage an interrupted MCAP recording)", 1) from exc


def check_output_path(path: str | Path, overwrite: bool = False) -> None:
    """Fail with one line if ``path`` exists (without ``overwrite``) or its folder does not."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise UserError(f"output {p} exists already; pass --overwrite to replace it or choose "
                        "another -o", 1)
    if not p.parent.is_dir():
        raise UserError(f"output directory {p.parent} does not exist; create it (mkdir -p "
                        f"{p.parent}) or choose another -o", 1)
