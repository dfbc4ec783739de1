"""Security: no pickled code is ever executed, no shell, no eval; parameters and model paths
are validated; model files are verified before use; nothing listens on a TCP port.

The static scan reads the package's own sources with ``ast`` (so text in strings and
comments, like the advice "torch.load(path, weights_only=False)" in an error message, is not
code). Download verification (sha256, size, resumed ``.part`` files) has its own tests in
test/cli/test_models_cli.py and test/engines/test_model_store.py, referenced below so they cannot vanish
unnoticed. The guarantees are listed in docs/RELIABILITY.md.
"""
from __future__ import annotations

import ast
import math
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "perception2d_ros"
SOURCES = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "launch").glob("*.py")) + [
    REPO / "setup.py"]


# --------------------------------------------------------------------------- static scan
def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → dotted origin for every import of a module (``np`` → ``numpy``)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(expr: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    root = aliases.get(expr.id, expr.id if not parts else f"<var>{expr.id}")
    return ".".join([root] + parts[::-1])


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


FORBIDDEN_CALLS = {
    "eval": "eval() runs arbitrary code",
    "exec": "exec() runs arbitrary code",
    "pickle.load": "unpickling runs arbitrary code",
    "pickle.loads": "unpickling runs arbitrary code",
    "pickle.Unpickler": "an unrestricted Unpickler runs arbitrary code (subclass it with "
                        "find_class instead)",
    "_pickle.load": "unpickling runs arbitrary code",
    "_pickle.loads": "unpickling runs arbitrary code",
    "dill.load": "unpickling runs arbitrary code",
    "dill.loads": "unpickling runs arbitrary code",
    "joblib.load": "joblib unpickles",
    "marshal.load": "marshal loads code objects",
    "marshal.loads": "marshal loads code objects",
    "shelve.open": "shelve unpickles",
    "torch.hub.load": "torch.hub runs downloaded code",
    "yaml.unsafe_load": "unsafe YAML constructs Python objects",
    "yaml.full_load": "full YAML loader constructs Python objects",
    "os.system": "runs a shell",
    "os.popen": "runs a shell",
    "subprocess.getoutput": "runs a shell",
    "subprocess.getstatusoutput": "runs a shell",
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader",
                     "yaml.CBaseLoader"}


def scan(source: str, filename: str = "<src>") -> list[str]:
    """Findings (``file:line: why``) of the rules above in one Python source."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def bad(node: ast.AST, why: str) -> None:
        found.append(f"{filename}:{node.lineno}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b, aliases) for b in node.bases}
            if bases & {"pickle.Unpickler", "_pickle.Unpickler"}:
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if "find_class" not in methods:
                    bad(node, f"Unpickler subclass {node.name} without a restricting find_class")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        if name in FORBIDDEN_CALLS:
            bad(node, f"{name}: {FORBIDDEN_CALLS[name]}")
        if _is_true(_kw(node, "shell")):
            bad(node, f"{name}(shell=True): runs a shell")
        if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            bad(node, "torch.load without weights_only=True unpickles arbitrary code")
        if name in ("numpy.load", "numpy.lib.npyio.load") and _is_true(_kw(node, "allow_pickle")):
            bad(node, "numpy.load(allow_pickle=True) unpickles")
        if name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader")
            if loader is None and len(node.args) > 1:
                loader = node.args[1]
            if loader is None or _dotted(loader, aliases) not in SAFE_YAML_LOADERS:
                bad(node, f"{name} without a safe Loader constructs Python objects")
    return found


def test_the_scanner_catches_every_rule():
    """The scan is only worth something if it finds what it looks for."""
    src = '''
import pickle, pickle as pk, yaml, torch, numpy as np, subprocess, os
from pickle import loads
from torch import load as tload
eval("1"); exec("x = 1")
pickle.load(f); pk.loads(b); loads(b); pickle.Unpickler(f).load()
class Loose(pickle.Unpickler):
    pass
torch.load(p); torch.load(p, weights_only=False); tload(p)
np.load(p, allow_pickle=True)
yaml.load(s); yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s); yaml.full_load(s)
subprocess.run("ls", shell=True); os.system("ls")
torch.hub.load("x", "y")
'''
    found = scan(src)
    for want in ("eval()", "exec()", "pickle.load:", "pickle.loads:", "pickle.Unpickler:",
                 "Unpickler subclass Loose", "yaml.load without", "yaml.unsafe_load",
                 "yaml.full_load", "shell=True", "os.system", "torch.hub.load",
                 "allow_pickle=True"):
        assert any(want in f for f in found), (want, found)
    assert sum("torch.load without" in f for f in found) == 3, found
    assert sum("yaml.load without" in f for f in found) == 2, found
    ok = '''
import ast, pickle, yaml, torch, numpy as np, subprocess
ast.literal_eval("1"); model.eval(); torch.load(p, map_location="cpu", weights_only=True)
yaml.safe_load(s); yaml.load(s, Loader=yaml.SafeLoader); np.load(p, allow_pickle=False)
subprocess.Popen(["ls"]); msg = "torch.load(path, weights_only=False)"
class Safe(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(name)
Safe(f).load()
'''
    assert scan(ok) == []


def test_package_sources_never_execute_untrusted_code():
    """Every torch.load is weights_only=True; no pickle/marshal/shelve/joblib loads, no
    unrestricted Unpickler, no eval/exec, no shell, no unsafe YAML, no torch.hub."""
    assert len(SOURCES) > 30 and PACKAGE / "engines" / "factory.py" in SOURCES
    findings = [f for p in SOURCES for f in scan(p.read_text(encoding="utf-8"),
                                                  str(p.relative_to(REPO)))]
    assert findings == []


def test_torch_load_is_used_and_always_weights_only():
    """The scan above is not vacuous: the checkpoint readers do call torch.load."""
    calls = []
    for p in SOURCES:
        tree = ast.parse(p.read_text(encoding="utf-8"))
        aliases = _aliases(tree)
        calls += [(p.name, _is_true(_kw(n, "weights_only"))) for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and _dotted(n.func, aliases) == "torch.load"]
    assert len(calls) >= 3 and all(ok for _, ok in calls), calls


# --------------------------------------------------------------------------- malicious files
class _Payload:
    """Unpickling this creates ``path`` (what an attacker's code would do, harmlessly)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _loaders():
    from perception2d_ros.models.clip.checkpoint import read_state_dict
    from perception2d_ros.models.lseg.checkpoint import read_checkpoint
    from perception2d_ros.models.sam.checkpoint import load_state_dict

    return {"clip.read_state_dict": read_state_dict, "lseg.read_checkpoint": read_checkpoint,
            "sam.load_state_dict": load_state_dict}


@pytest.mark.parametrize("container", ["torch.save", "torchscript-zip"])
def test_malicious_checkpoints_are_refused_without_running_their_code(tmp_path, container):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.pt"
    if container == "torch.save":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "evil": _Payload(marker)}, ckpt)
    else:  # looks like a TorchScript archive: its data.pkl goes through a restricted reader
        with zipfile.ZipFile(ckpt, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
            z.writestr("archive/code/__torch__/m.py", "")
            z.writestr("archive/constants.pkl", pickle.dumps(()))
    loaders = _loaders()
    for name, load in loaders.items():
        if container == "torchscript-zip" and name != "clip.read_state_dict":
            continue  # the others read every file with torch.load(weights_only=True)
        with pytest.raises(Exception) as info:
            load(ckpt)
        assert not marker.exists(), f"{name} executed code from the checkpoint"
        assert type(info.value).__name__ in ("CheckpointError", "ValueError"), info.value
    assert not marker.exists()


# --------------------------------------------------------------------------- model paths
def _models(tmp_path: Path) -> Path:
    import yaml

    d = tmp_path / "models"
    d.mkdir()
    (d / "manifest.yaml").write_text(yaml.safe_dump({"models": {"m": {
        "kind": "detector", "file": "m.onnx", "licence": "MIT", "source": "test"}}}))
    (d / "m.onnx").write_bytes(b"inside")
    return d


def test_model_paths_outside_the_models_dir_are_refused(tmp_path):
    from perception2d_ros.engines import model_store as ms

    d = _models(tmp_path)
    outside = tmp_path / "elsewhere" / "x.onnx"
    outside.parent.mkdir()
    outside.write_bytes(b"outside")
    (d / "link.onnx").symlink_to(outside)
    for name in (str(outside), "../elsewhere/x.onnx", str(d / "link.onnx"), "/etc/passwd"):
        with pytest.raises(ms.ModelFileError, match="neither a known model"):
            ms.resolve(name, d)
    path, _ = ms.resolve(str(outside), d, allow_outside=True)  # an explicit user choice
    assert path == outside.resolve()
    path, entry = ms.resolve("m", d)
    assert entry is not None and path.read_bytes() == b"inside"


def test_model_files_are_verified_before_use(tmp_path, models_dir):
    """A manifest model whose bytes differ from its sha256 is never handed to an engine."""
    from perception2d_ros.engines import model_store as ms

    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(models_dir / "manifest.yaml", d)
    data = bytearray((models_dir / "yolox_nano.onnx").read_bytes())
    data[1000] ^= 0xFF
    (d / "yolox_nano.onnx").write_bytes(bytes(data))
    with pytest.raises(ms.ModelFileError, match="sha256 mismatch"):
        ms.resolve("yolox_nano", d)
    (d / "yolox_nano.onnx.part").write_bytes(bytes(data))
    with pytest.raises(ms.ModelFileError, match="incomplete download"):
        ms.resolve(str(d / "yolox_nano.onnx.part"), d)


def test_download_verification_has_its_own_tests():
    """fetch: sha256 and size checked before a download is moved into place, corrupt
    resumed parts rejected, partial files never used (tests in test_models_cli.py /
    test_model_store.py)."""
    cli = (REPO / "test" / "cli" / "test_models_cli.py").read_text()
    store = (REPO / "test" / "engines" / "test_model_store.py").read_text()
    for name in ("test_sha_mismatch_is_rejected_and_nothing_is_left_in_place",
                 "test_a_corrupt_resumed_part_is_rejected",
                 "test_partial_download_is_kept_and_never_used",
                 "test_size_announced_by_server_must_match_the_manifest",
                 "test_fetch_refuses_what_it_cannot_verify_or_download",
                 "test_verify_detects_a_flipped_byte"):
        assert f"def {name}(" in cli, name
    for name in ("test_loader_rejects_paths_outside_the_models_dir",
                 "test_partial_files_are_never_resolved"):
        assert f"def {name}(" in store, name


# --------------------------------------------------------------------------- ROS side
rclpy = pytest.importorskip("rclpy", reason="node tests need rclpy (installed by `make test`)")

from rclpy.parameter import Parameter  # noqa: E402

from perception2d_ros.ros.perception_node import PerceptionNode  # noqa: E402
from ros_harness import RosHarness, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def ros():
    h = RosHarness()
    yield h
    h.close()


@pytest.fixture(scope="module")
def detector(ros):
    node = PerceptionNode("detector_node", node_name="sec_detector", context=ros.context,
                          namespace="/sec")
    ros.add_node(node)
    assert node.pipeline is not None
    return node


def _set_remote(ros, node, name: str, value) -> tuple[bool, str]:
    """Set a parameter through the node's parameter service, as `ros2 param set` does."""
    from rcl_interfaces.srv import SetParameters

    cli = ros.node.create_client(SetParameters, f"{node.get_fully_qualified_name()}/set_parameters")
    try:
        assert cli.wait_for_service(timeout_sec=10)
        for _ in range(5):  # a request racing service discovery may be lost: ask again
            fut = cli.call_async(SetParameters.Request(
                parameters=[Parameter(name, value=value).to_parameter_msg()]))
            if wait_for(fut.done, 3):
                res = fut.result().results[0]
                return res.successful, res.reason
        raise AssertionError("set_parameters did not answer")
    finally:
        ros.node.destroy_client(cli)


@pytest.mark.ros
@pytest.mark.parametrize(("name", "value", "reason"), [
    ("detect.conf_threshold", 1.5, "outside [0, 1]"),
    ("detect.conf_threshold", -0.1, "outside [0, 1]"),
    ("detect.conf_threshold", math.nan, "outside [0, 1]"),
    ("detect.iou_threshold", 2.0, "outside [0, 1]"),
    ("detect.max_detections", 0, "outside [1, inf)"),
    ("detect.threads", -1, "outside [0, inf)"),
    ("detect.backend", "cuda_magic", "must be one of"),
    ("detect.device", "tpu", "must be one of"),
    ("detect.precision", "fp8", "must be one of"),
    ("sync_slop_ms", -5.0, "outside [0, inf)"),
    ("sync_slop_ms", math.inf, "outside [0, inf)"),
    ("diagnostics_period_s", 0.0, "outside (0, inf)"),
    ("image_reliability", "sometimes", "must be one of"),
    ("input", "both", "must be one of"),
    ("interpolation", "bicubic2", "must be one of"),
    ("output_encoding", "jpeg", "must be one of"),
    ("stages", ["rectify", "os.system"], "stages must be among"),
])
def test_out_of_range_parameters_are_rejected(ros, detector, name, value, reason):
    before = detector.get_parameter(name).value
    ok, why = _set_remote(ros, detector, name, value)
    assert not ok and why.startswith(f"{name}: ") and reason in why, why
    after = detector.get_parameter(name).value
    assert after == before or (isinstance(before, float) and math.isnan(before))


@pytest.mark.ros
def test_valid_parameters_are_accepted(ros, detector):
    assert _set_remote(ros, detector, "detect.conf_threshold", 0.5) == (True, "")
    assert detector.get_parameter("detect.conf_threshold").value == 0.5
    assert _set_remote(ros, detector, "detect.conf_threshold", 0.3)[0]


@pytest.mark.ros
def test_out_of_range_values_given_at_start_fail_configure(ros, capfd):
    """Values from a params file / overrides bypass the set callback: configure checks them."""
    capfd.readouterr()
    node = PerceptionNode("detector_node", node_name="sec_bad_start", context=ros.context,
                          namespace="/sec", parameter_overrides=[
                              Parameter("detect.conf_threshold", value=1.5)])
    try:
        assert node.pipeline is None
        assert node._state_machine.current_state[1] == "unconfigured"
        err = capfd.readouterr().err
        assert "configure failed: detect.conf_threshold: 1.5 is outside [0, 1]" in err, err
    finally:
        node.destroy_node()


def _listening_tcp_inodes() -> set[int]:
    """Inodes of TCP sockets in LISTEN state (IPv4 and IPv6) owned by this process."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                listening.add(int(f[9]))
    return listening & _own_socket_inodes()


def _own_socket_inodes() -> set[int]:
    out = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _udp_inodes() -> set[int]:
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            inodes |= {int(ln.split()[9]) for ln in Path(table).read_text().splitlines()[1:]}
        except OSError:
            continue
    return inodes & _own_socket_inodes()


@pytest.mark.ros
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_nothing_listens_on_a_tcp_port(tmp_path):
    """A pipeline_node running in this process opens no listening TCP socket; DDS
    (Fast DDS: UDP discovery + shared memory) is all it talks."""
    tcp_before, udp_before = _listening_tcp_inodes(), _udp_inodes()
    h = RosHarness()
    try:
        node = PerceptionNode("pipeline_node", node_name="sec_pipeline", context=h.context,
                              namespace="/sec_net")
        h.add_node(node)
        assert node._state_machine.current_state[1] == "active"
        assert wait_for(lambda: len(_udp_inodes() - udp_before) > 0, 10), \
            "DDS sockets not seen: the check would be blind"
        new_tcp = _listening_tcp_inodes() - tcp_before
        assert new_tcp == set(), f"listening TCP sockets opened by the node: {new_tcp}"
    finally:
        h.close()


def test_node_refuses_a_model_path_outside_the_models_dir(tmp_path, models_dir):
    """detect.model pointing outside models_dir is refused at configure unless
    detect.allow_outside_models_dir is set (parameters can be set by anyone on the domain)."""
    import shutil

    from perception2d_ros.engines.model_store import ModelFileError
    from perception2d_ros.pipeline.build import build_pipeline
    from perception2d_ros.pipeline.config import merge_config

    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(models_dir / "yolox_nano.onnx", outside)
    cfg = {"stages": ["detect"], "detect": {"model": str(outside)}}
    with pytest.raises(ModelFileError, match="models directory"):
        build_pipeline(merge_config(cfg))
    cfg["detect"]["allow_outside_models_dir"] = True
    assert build_pipeline(merge_config(cfg)).names == ["detect"]
