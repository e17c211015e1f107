"""Checks of the INSTALLED wheel (run by .ci/wheel_check.sh from outside the repository, TRITON_INTERPRET=1):

1. `rklu_fast` is imported from the wheel's venv, not the source tree;
2. the wheel holds every file git tracks under rklu_fast/ and every compiled extension the source build made;
3. its declared dependencies are installed at versions they allow, and every third-party module the package imports
   at module level is declared;
4. the loss, on every backend usable on the CPU (the compiled `cpu` one must load), equals an independent float64
   computation, both directions, loss and gradient.
"""
import argparse
import ast
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_origin(venv: Path) -> None:
    import rklu_fast
    origin = Path(rklu_fast.__file__).resolve()
    assert origin.is_relative_to(venv.resolve()), f"rklu_fast imported from {origin}, not from the wheel in {venv}"
    print(f"imported from {origin.parent}")


def check_contents(wheel: Path, repo: Path) -> set:
    names = set(zipfile.ZipFile(wheel).namelist())
    try:
        tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "rklu_fast"], capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the Python files
        tracked = [str(p.relative_to(repo)) for p in (repo / "rklu_fast").rglob("*.py")]
    missing = sorted(set(tracked) - names)
    assert not missing, f"files tracked under rklu_fast/ missing from {wheel.name}: {missing}"
    built = {p.name.split(".")[0] for p in (repo / "rklu_fast").glob("_C*.so")}
    in_wheel = {Path(n).name.split(".")[0] for n in names if re.fullmatch(r"rklu_fast/_C[^/]*\.so", n)}
    assert "_C" in in_wheel, f"{wheel.name} holds no compiled CPU extension rklu_fast/_C*.so: {sorted(names)}"
    assert built <= in_wheel, f"the source build made {sorted(built)}, the wheel holds {sorted(in_wheel)}"
    print(f"{wheel.name}: {len(tracked)} tracked files, extensions {sorted(in_wheel)}")
    return in_wheel


def check_dependencies() -> None:
    dist = md.distribution("rklu_fast")
    declared = set()
    for line in dist.requires or []:
        req = Requirement(line)
        extras = [m.group(1) for m in re.finditer(r"extra == \"([^\"]+)\"", str(req.marker or ""))]
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or [""]):
            continue  # not for this platform
        declared.add(norm(req.name))
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            raise AssertionError(f"declared dependency {line!r} is not installed") from None
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {line!r}"
    # third-party modules imported at module level (imports inside functions are optional features)
    to_dists = md.packages_distributions()
    pkg = Path(dist.locate_file("rklu_fast"))
    undeclared = {}
    for path in pkg.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top == "rklu_fast":
                    continue
                dists = {norm(d) for d in to_dists.get(top, [top])}
                if not dists & declared:
                    undeclared.setdefault(top, []).append(str(path.relative_to(pkg.parent)))
    assert not undeclared, f"imported at module level but not declared in pyproject.toml: {undeclared}"
    print(f"{len(declared)} declared dependencies installed and satisfied; every module-level import declared")


def check_loss(cuda_built: bool) -> None:
    import torch

    import rklu_fast
    from rklu_fast import cpp_backend

    assert cpp_backend.BUILT_CPU, f"the wheel's C++ extension does not load: {cpp_backend.BUILD_ERROR}"
    assert cpp_backend.BUILT_CUDA == cuda_built, f"CUDA extension in the wheel: {cuda_built}, loaded: " \
                                                 f"{cpp_backend.BUILT_CUDA} ({cpp_backend.BUILD_ERROR})"
    status = rklu_fast.backends()
    usable = [name for name in ("torch", "cpu", "triton") if status[name]["usable"]]
    assert usable == ["torch", "cpu", "triton"], status
    torch.manual_seed(0)
    s, o, a = (torch.randn(2, 3, 50) * 2 for _ in range(3))
    labels = torch.tensor([[1, -100, 3], [4, 5, -100]])
    valid = labels != -100
    for reverse in (True, False):
        # float64 from the definition: teacher l_o − α·relu(l_aug − l_o), log-softmax, KL, mean over valid rows
        s64 = s.double().requires_grad_()
        logp = torch.log_softmax(s64, -1)
        logq = torch.log_softmax(o.double() - 8.0 * torch.relu(a.double() - o.double()), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1) if reverse else (logq.exp() * (logq - logp)).sum(-1)
        expect = kl[valid].sum() / valid.sum()
        (expect_grad,) = torch.autograd.grad(expect, s64)
        for backend in usable:
            x = s.clone().requires_grad_()
            fn = rklu_fast.reverse_kl_loss if reverse else rklu_fast.forward_kl_loss
            loss = fn(x, o, a, 8.0, labels=labels, backend=backend)
            loss.backward()
            err = abs(loss.item() - expect.item())
            grad_err = ((x.grad.double() - expect_grad).norm() / expect_grad.norm()).item()
            assert err <= 1e-5 * abs(expect.item()) + 1e-6 and grad_err <= 3e-5, (backend, reverse, err, grad_err)
    print(f"loss and gradient match float64 on {usable}, reverse and forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, required=True)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--venv", type=Path, required=True)
    args = ap.parse_args()
    check_origin(args.venv)
    in_wheel = check_contents(args.wheel, args.repo)
    check_dependencies()
    check_loss(cuda_built="_C_cuda" in in_wheel)


if __name__ == "__main__":
    main()
