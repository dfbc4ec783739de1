"""The runtime install (`make demo`: requirements/runtime.txt + build.txt) has no torch, so the
demo and the CLI must neither need nor import it; torch-only features say how to get it.

A venv without torch is simulated by a ``sitecustomize`` that makes ``import torch`` (and the
torch-based reference packages) fail in the process and in every child process it starts.
`benchmarks/install_size.py --demo` runs the same `make demo` in a real torch-free venv."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH_PACKAGES = ("torch", "torchvision", "open_clip", "timm", "segment_anything", "mobile_sam")
BLOCKER = f'''
import sys
class _NoTorch:
    """This interpreter behaves as if the torch extra were not installed."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TORCH_PACKAGES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
'''
# runs the CLI in-process, then reports whether torch got imported
CHECK = '''
import json, sys
from perception2d_ros.cli.main import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch_imported": "torch" in sys.modules}), file=sys.stderr)
sys.exit(rc)
'''


def _env(tmp_path: Path, block: bool) -> dict[str, str]:
    paths = [str(REPO)]
    if block:
        site = tmp_path / "no_torch_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCKER)
        paths.insert(0, str(site))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env["ROS_DOMAIN_ID"] = str(151 + int(env.get("ROS_DOMAIN_ID", "0")) % 80)
    return env


def cli(tmp_path: Path, *args: str, block: bool = True) -> tuple[subprocess.CompletedProcess,
                                                                dict]:
    r = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True,
                       env=_env(tmp_path, block), cwd=REPO, timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "{}"
    return r, (json.loads(last) if last.startswith("{") else {})


def test_blocker_really_hides_torch(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=_env(tmp_path, True),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


@pytest.mark.parametrize("block", [True, False], ids=["torch-absent", "torch-installed"])
def test_detect_and_process_run_without_importing_torch(tmp_path, data_dir, block):
    images = data_dir / "coco" / "images"
    r, rep = cli(tmp_path, "detect", str(images / "000000480985.jpg"), "--json", block=block)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)[0]["detections"]
    assert rep == {"rc": 0, "torch_imported": False}

    bag, out = tmp_path / "in.mcap", tmp_path / "out.mcap"
    r, rep = cli(tmp_path, "bag", "make", "--images", str(images), "--limit", "3",
                 "--camera-info", str(data_dir / "camera_info" / "left_plumb_bob.yaml"),
                 "--resize", "640x480", "--rate", "5", "--frame-id", "camera_optical", str(bag),
                 block=block)
    assert r.returncode == 0 and rep["torch_imported"] is False, r.stderr[-2000:]
    r, rep = cli(tmp_path, "process", str(bag), "-o", str(out), "--debug-image", block=block)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "processed 3/3 frames" in r.stdout
    assert rep == {"rc": 0, "torch_imported": False}


def test_make_demo_path_runs_without_torch(tmp_path):
    """`make demo`'s command (bringup nodes over DDS, in child processes) with torch absent."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "perception2d_ros.demo.run", "--out", str(out),
                        "--frames", "4"], cwd=REPO, env=_env(tmp_path, True),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_out"] >= 1


@pytest.mark.parametrize("args, feature", [
    (["detect", "models/sample.jpg", "--backend", "torch"], "backend 'torch'"),
    (["models", "export", "sam_vit_b", "--random-weights"], "models export sam_vit_b"),
])
def test_torch_features_name_the_extra_when_torch_is_missing(tmp_path, args, feature):
    if args[0] == "models":
        args = args + ["--models-dir", str(tmp_path / "models")]
    r, _ = cli(tmp_path, *args)
    assert r.returncode != 0
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if feature in ln]
    assert lines, r.stderr[-2000:]
    assert "requirements/torch.txt" in lines[0]
    assert "Traceback" not in r.stderr


def test_runtime_requirements_have_no_torch():
    """torch and the reference packages live in the extras, never in the runtime files."""
    req = REPO / "requirements"
    runtime = (req / "runtime.txt").read_text() + (req / "build.txt").read_text()
    names = {ln.split("#")[0].strip().split("[")[0].split("=")[0].split(">")[0].split("<")[0]
             .split("~")[0].strip().lower() for ln in runtime.splitlines()}
    assert not names & {"torch", "torchvision", "open-clip-torch", "open_clip_torch", "timm",
                        "segment-anything", "mobilesam-mirror", "pytest"}
    assert "torch==" in (req / "torch.txt").read_text()
    assert "-r torch.txt" in (req / "test.txt").read_text()


def test_make_setup_puts_the_commands_on_the_venv_path():
    """`make setup` installs the package editable into .venv: the CLI and every node must be in
    .venv/bin (the setup.cfg that puts them in lib/perception2d for colcon applies to
    `setup.py develop`; the Makefile uses the PEP 660 editable install, which ignores it)."""
    venv = REPO / ".venv"
    if not venv.exists() or Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip("checks the project's own .venv; this run uses another interpreter")
    for name in ("perception2d", "pipeline_node", "rectify_node", "detector_node",
                 "track_node", "sam_node", "clip_node", "lseg_node"):
        assert (Path(sys.prefix) / "bin" / name).is_file(), f".venv/bin/{name} is missing"
