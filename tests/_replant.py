"""Re-apply issue 20's nine audited bugs by hand, one at a time, in a copy of ``src/``, and run the tests
that must catch them (``make replant``; not in CI: about 3 minutes).

Each bug is a literal text substitution in one file; the script fails loudly when a substitution no longer
matches (the code moved: update the bug), and exits non-zero when any bug makes no test fail.
Usage: ``python tests/_replant.py [PYTEST ARGS]`` from the repository root (default: tests/test_survivors.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (file under src/odedit_hf, [(text, replacement), ...])
BUGS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "single/batch protocols stop resetting the adapter": (
        "evaluation/protocols.py",
        [
            ("session.snapshot.restore()  # a fresh adapter for this edit", "pass"),
            ("session.snapshot.restore()  # roll back", "pass"),
        ],
    ),
    "ODEdit total uses - alpha*R_loc": (
        "methods/odedit/objective.py",
        [("total = total + cfg.alpha * r_loc", "total = total - cfg.alpha * r_loc")],
    ),
    "the dual step removed from the per-edit loop": (
        "methods/odedit/method.py",
        [("stepped = dual_step(self.lambda_net, self.dual_optimizer, skip=not active)", "stepped = False")],
    ),
    "MMD bandwidths recomputed every step": (
        "methods/odedit/objective.py",
        [
            (
                "bandwidths = {i: self.pre.bandwidths.get(cid) for i, cid in enumerate(edit_batch.case_ids)}",
                "_, _now = gen_pairs(outputs, edit_batch, cfg, None); bandwidths = "
                "{i: median_bandwidths(v, cfg.mmd_bandwidth_multipliers) for i, v in _now.items()}",
            )
        ],
    ),
    "the generality anchor's detach inverted": (
        "methods/odedit/risks.py",
        [
            (
                "x = xs[owner].detach() if config.gen_anchor_edit else xs[owner]",
                "x = xs[owner] if config.gen_anchor_edit else xs[owner].detach()",
            )
        ],
    ),
    "M-Locality (easyedit) uses top-1 instead of top-10": (
        "evaluation/metrics.py",
        [("EASYEDIT_IMAGE_TOPK = 10", "EASYEDIT_IMAGE_TOPK = 1")],
    ),
    "the final hash check after unloading dropped": (
        "evaluation/protocols.py",
        [('session.check("after unloading the adapter at the end of the run")', "pass")],
    ),
    "the base-weight hash skips buffers": (
        "editing/rollback.py",
        [("[*model.named_parameters(), *model.named_buffers()]", "[*model.named_parameters()]")],
    ),
    "the image path check uses startswith(root)": (
        "data/images.py",
        [("if os.path.commonpath([root, resolved]) != root:", "if not resolved.startswith(root):")],
    ),
}


def main(argv: list[str]) -> int:
    tests = argv or ["tests/test_survivors.py"]
    missed = []
    with tempfile.TemporaryDirectory(prefix="odedit-replant-") as tmp:
        for bug, (rel, subs) in BUGS.items():
            copy = Path(tmp) / "src"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ROOT / "src", copy)
            path = copy / "odedit_hf" / rel
            text = path.read_text()
            for old, new in subs:
                if old not in text:
                    raise SystemExit(
                        f"replant: {bug!r}: {old!r} is no longer in src/odedit_hf/{rel}; update the bug"
                    )
                text = text.replace(old, new)
            path.write_text(text)
            env = dict(os.environ, PYTHONPATH=f"{copy}{os.pathsep}{ROOT / 'kernels'}", OMP_NUM_THREADS="1")
            env.setdefault("TRITON_INTERPRET", "1")
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests]
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).stdout
            failed = sorted(set(re.findall(r"^FAILED (\S+)", out, re.M)))
            print(f"{bug}: {'caught by ' + ', '.join(failed) if failed else 'NOT CAUGHT'}", flush=True)
            if not failed:
                missed.append(bug)
    if missed:
        print(f"replant: {len(missed)} bug(s) survived: {missed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
