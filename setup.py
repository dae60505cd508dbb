"""Build script for the optional, torch-free CUDA extension ``pllm_kernels._C``.

Project metadata lives in pyproject.toml; this file only decides whether and how to build ``_C``.

* ``csrc/*.cu`` are compiled by ``nvcc`` (in parallel, one job per file) into object files, ``python_bindings/*.cpp``
  and ``csrc/*.cpp`` (the CPU emulator of the kernels, for tests) by the host C++ compiler with pybind11 and CUDA
  includes; everything is linked with the static CUDA runtime. No torch headers, no torch ABI.
* nvcc always runs with ``-lineinfo -Xptxas -v``: the resource report (registers, spills, shared memory of every
  kernel, per architecture) is saved as ``pllm_kernels/_C.resources.txt`` next to the built module (and per object
  file under ``build/``); ``tests/cuda/test_lora_cuda_build.py`` fails on any register spill.
* No ``nvcc`` -> the extension is skipped with a warning and the package stays pure Python + Triton. The end of the
  build prints one line saying whether ``pllm_kernels._C`` was built and for which architectures.

Environment variables:

``PLLM_SKIP_CUDA_BUILD=1``    do not build the extension.
``PLLM_REQUIRE_CUDA_EXT=1``   a missing nvcc or any compile/link failure is an error (CI sets this).
``PLLM_CUDA_ARCHS``           SASS targets, ``"80;90"`` by default (``;``/``,``/space separated, ``90a`` allowed).
                              PTX of the highest arch is embedded too, so newer GPUs can JIT it.
``PLLM_PTXAS_VERBOSE=1``      also print the ``-Xptxas -v`` report to the build log (it is always saved to a file).
``PLLM_NVCC_FLAGS``           extra nvcc flags (shell-split).
``MAX_JOBS``                  parallel nvcc processes (default: CPU count).
``CUDA_HOME`` / ``CUDA_PATH`` CUDA toolkit root; else found from ``nvcc`` on PATH.

Works with ``pip install .``, ``pip install -e .`` and ``python setup.py build_ext --inplace`` (the latter needs only
setuptools + pybind11, no network).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
def _version() -> str:
    """The version from pllm_kernels/_version.py (its one place), without importing the package."""
    with open(os.path.join(ROOT, "pllm_kernels", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


VERSION = _version()
EXT_NAME = "pllm_kernels._C"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


SKIP = _truthy("PLLM_SKIP_CUDA_BUILD")
REQUIRE = _truthy("PLLM_REQUIRE_CUDA_EXT")


RESOURCE_REPORT = "_C.resources.txt"
_REPORT_SUFFIX = ".ptxas.txt"
# What happened to the extension, for the one-line summary at the end of the build.
_STATUS: dict = {"built": False, "reason": "not attempted"}


def _ptx_arch(archs: list[str]) -> str | None:
    plain = [a for a in archs if a.isdigit()]
    return plain[-1] if plain else None


def _is_ptxas_info(line: str) -> bool:
    s = line.strip()
    return s.startswith("ptxas info") or (s.endswith("bytes spill loads") and "stack frame" in s)


def _print_status() -> None:
    if _STATUS.get("built"):
        archs = ", ".join(f"sm_{a}" for a in _STATUS["archs"])
        ptx = f" + PTX compute_{_STATUS['ptx']}" if _STATUS.get("ptx") else ""
        msg = f"CUDA extension {EXT_NAME} BUILT for {archs}{ptx}; resource report {_STATUS['report']}"
    else:
        msg = f"CUDA extension {EXT_NAME} NOT BUILT ({_STATUS.get('reason')}): pure Python + Triton package"
    print(f"\n[pllm_kernels setup] {msg}\n", file=sys.stderr, flush=True)


def _parallel_host_compile(compiler) -> None:
    """Let the distutils compiler compile the sources of one extension in parallel (MAX_JOBS / CPU count)."""
    if getattr(compiler, "_pllm_parallel", False):
        return
    orig = compiler.compile

    def compile_parallel(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                         extra_postargs=None, depends=None):
        jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or (os.cpu_count() or 1)
        if len(sources) <= 1 or jobs <= 1:
            return orig(sources, output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs, depends)

        def one(src):
            return orig([src], output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs, depends)

        with ThreadPoolExecutor(max_workers=min(jobs, len(sources))) as pool:
            return [obj for objs in pool.map(one, sources) for obj in objs]

    compiler.compile = compile_parallel
    compiler._pllm_parallel = True


def _warn(msg: str) -> None:
    print(f"\n[pllm_kernels setup] WARNING: {msg}\n", file=sys.stderr, flush=True)


def _fail(msg: str) -> None:
    raise SystemExit(f"\n[pllm_kernels setup] ERROR: {msg}\n")


def _rel(path: str) -> str:
    # setuptools wants source paths relative to the project root.
    return os.path.relpath(path, ROOT)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    return shutil.which("nvcc")


def _is_cuda_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home(nvcc: str) -> str | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append(os.path.dirname(os.path.dirname(os.path.abspath(nvcc))))
    for c in cands:
        if _is_cuda_root(c):
            return os.path.realpath(c)
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc): ask nvcc itself.
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m and _is_cuda_root(m.group(1).strip()):
            return os.path.realpath(m.group(1).strip())
    except Exception:
        pass
    for c in ("/usr/local/cuda", "/opt/cuda"):
        if _is_cuda_root(c):
            return os.path.realpath(c)
    return None


def _cuda_lib_dir(cuda_home: str) -> str | None:
    for sub in (
        "lib64",
        os.path.join("targets", "x86_64-linux", "lib"),
        os.path.join("targets", "sbsa-linux", "lib"),
        "lib",
    ):
        d = os.path.join(cuda_home, sub)
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    return None


def _cuda_include_dir(cuda_home: str) -> str | None:
    for sub in (
        "include",
        os.path.join("targets", "x86_64-linux", "include"),
        os.path.join("targets", "sbsa-linux", "include"),
    ):
        d = os.path.join(cuda_home, sub)
        if os.path.isfile(os.path.join(d, "cuda_runtime.h")):
            return d
    return None


def _parse_archs() -> list[str]:
    raw = os.environ.get("PLLM_CUDA_ARCHS", "80;90")
    archs = []
    for tok in re.split(r"[;,\s]+", raw.strip()):
        tok = tok.strip().lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not tok:
            continue
        if not re.fullmatch(r"\d{2,3}[af]?", tok):
            _fail(f"bad entry {tok!r} in PLLM_CUDA_ARCHS={raw!r} (expected e.g. '80;90' or '90a')")
        if tok not in archs:
            archs.append(tok)
    if not archs:
        _fail(f"PLLM_CUDA_ARCHS={raw!r} names no architecture")
    return sorted(archs, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def _arch_num(a: str) -> int:
    return int(re.sub(r"\D", "", a))


def _nvcc_flags(archs: list[str], include_dirs: list[str]) -> list[str]:
    flags = [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-fvisibility=hidden",
        "-lineinfo",
        # Resource report (registers / spills / shared memory per kernel): always on, saved by CudaBuildExt.
        "-Xptxas",
        "-v",
    ]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the highest plain (non arch-specific) target so that newer GPUs can JIT-compile it.
    plain = [a for a in archs if a.isdigit()]
    ptx = plain[-1] if plain else None
    if ptx:
        flags += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    # Fallbacks for compilers that do not define __CUDA_ARCH_LIST__ (nvcc < 11.5).
    # nvcc splits option values at commas, so the list separator must be escaped ("80\\,90").
    flags.append("-DPLLM_ARCH_LIST=" + "\\,".join(str(_arch_num(a)) for a in archs))
    flags.append(f"-DPLLM_PTX_ARCH={_arch_num(ptx) if ptx else 0}")
    flags += shlex.split(os.environ.get("PLLM_NVCC_FLAGS", ""))
    for d in include_dirs:
        flags.append(f"-I{d}")
    return flags


class CudaBuildExt(build_ext):
    """build_ext that first compiles ``ext.cuda_sources`` with nvcc and links the objects in."""

    def run(self) -> None:
        super().run()
        # --inplace / editable installs import the module from the source tree: put the report next to it too
        # (during build_extension setuptools has inplace switched off).
        report = _STATUS.get("report")
        if _STATUS.get("built") and report and (self.inplace or getattr(self, "editable_mode", False)):
            dst = os.path.join(ROOT, "pllm_kernels", RESOURCE_REPORT)
            if os.path.abspath(report) != dst:
                shutil.copyfile(report, dst)
            _STATUS["report"] = dst
        _print_status()

    def build_extensions(self) -> None:
        # Host C++ sources (bindings, CPU emulator) compile in parallel too: setuptools compiles them one by one.
        _parallel_host_compile(self.compiler)
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        cuda_sources = getattr(ext, "cuda_sources", None)
        if not cuda_sources:
            return super().build_extension(ext)
        try:
            objects = self._compile_cuda(ext, cuda_sources)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            # relink when an nvcc object is newer than the .so (e.g. after a PLLM_CUDA_ARCHS change)
            ext.depends = list(ext.depends) + objects
            super().build_extension(ext)
            report = self._write_resource_report(ext)
            _STATUS.update(built=True, archs=list(ext.cuda_archs), ptx=_ptx_arch(ext.cuda_archs), report=report)
        except Exception as exc:  # noqa: BLE001 - any failure is either fatal (REQUIRE) or a warning
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            _STATUS.update(built=False, reason=f"build failed: {first}")
            if REQUIRE:
                _fail(f"building the CUDA extension {ext.name} failed (PLLM_REQUIRE_CUDA_EXT=1): {exc}")
            _warn(
                f"building the CUDA extension {ext.name} failed, continuing without it "
                f"(pure Python + Triton). Set PLLM_REQUIRE_CUDA_EXT=1 to make this an error.\n  reason: {exc}"
            )
            # No stale binary from an earlier build may survive (build/lib would put it into the wheel), and do not
            # report an output that does not exist (editable installs / bdist would try to copy it).
            stale = [self.get_ext_fullpath(ext.name)]
            if getattr(self, "editable_mode", False):  # pip install -e: the copy next to the sources is what imports
                stale.append(os.path.join(ROOT, self.get_ext_filename(ext.name)))
            for path in stale:
                if os.path.exists(path):
                    os.remove(path)
                    _warn(f"removed stale {path}")
            if ext in self.extensions:
                self.extensions.remove(ext)

    def _compile_cuda(self, ext: Extension, sources: list[str]) -> list[str]:
        nvcc = ext.nvcc
        flags = _nvcc_flags(ext.cuda_archs, [os.path.join(ROOT, d) for d in ext.cuda_include_dirs])
        obj_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        os.makedirs(obj_dir, exist_ok=True)
        headers = [os.path.join(ROOT, h) for h in ext.depends if not h.endswith(".cu")]
        newest_dep = max((os.path.getmtime(h) for h in headers if os.path.exists(h)), default=0.0)
        flags_sig = " ".join([nvcc] + flags)

        jobs = []
        for src in sources:
            src_abs = os.path.join(ROOT, src)
            stem = os.path.splitext(os.path.basename(src))[0]
            obj = os.path.join(obj_dir, stem + ".cu.o")
            sig = obj + ".cmd"
            up_to_date = (
                not self.force
                and os.path.exists(obj)
                and _read(sig) == flags_sig
                and os.path.getmtime(obj) >= max(os.path.getmtime(src_abs), newest_dep)
            )
            jobs.append((src_abs, obj, sig, up_to_date))

        def run(job):
            src_abs, obj, sig, up_to_date = job
            if up_to_date:
                return obj, None, ""
            cmd = [nvcc, *flags, "-c", src_abs, "-o", obj]
            print("[nvcc] " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            out = (proc.stdout or "") + (proc.stderr or "")
            if proc.returncode != 0:
                return obj, f"nvcc failed on {os.path.relpath(src_abs, ROOT)} (exit {proc.returncode}):\n{out}", out
            with open(obj + _REPORT_SUFFIX, "w") as f:
                f.write(f"# source: {os.path.relpath(src_abs, ROOT)}\n{out}")
            with open(sig, "w") as f:
                f.write(flags_sig)
            print(f"[nvcc] {os.path.relpath(src_abs, ROOT)}: {time.monotonic() - t0:.1f} s", flush=True)
            return obj, None, out

        max_jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or (os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, min(max_jobs, len(jobs)))) as pool:
            results = list(pool.map(run, jobs))
        errors = []
        verbose = _truthy("PLLM_PTXAS_VERBOSE")
        for _obj, err, out in results:
            # The ptxas report is long: print it only when asked; warnings and errors always.
            text = out if verbose else "\n".join(ln for ln in out.splitlines() if not _is_ptxas_info(ln))
            if text.strip():
                print(text, end="" if text.endswith("\n") else "\n", flush=True)
            if err:
                errors.append(err)
        if errors:
            raise RuntimeError("\n".join(errors))
        objects = [obj for obj, _, _ in results]
        self._pllm_reports = [obj + _REPORT_SUFFIX for obj in objects]
        return objects

    def _write_resource_report(self, ext: Extension) -> str:
        """Merge the per-object ptxas reports into ``_C.resources.txt`` next to the built module."""
        parts = [f"# {ext.name} resource report: nvcc -Xptxas -v, archs {','.join(ext.cuda_archs)}\n"]
        for path in getattr(self, "_pllm_reports", []):
            parts.append(_read(path) or f"# missing report {path}\n")
        text = "".join(p if p.endswith("\n") else p + "\n" for p in parts)
        target = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), RESOURCE_REPORT)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(text)
        return target


def _make_extensions() -> list[Extension]:
    if SKIP:
        if REQUIRE:
            _fail("PLLM_SKIP_CUDA_BUILD and PLLM_REQUIRE_CUDA_EXT are both set")
        _warn("PLLM_SKIP_CUDA_BUILD is set: not building the CUDA extension pllm_kernels._C.")
        _STATUS.update(built=False, reason="PLLM_SKIP_CUDA_BUILD is set")
        return []

    nvcc = _find_nvcc()
    if nvcc is None:
        msg = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        if REQUIRE:
            _fail(f"{msg}; PLLM_REQUIRE_CUDA_EXT=1 requires the CUDA extension.")
        _warn(f"{msg}: building pllm_kernels without the CUDA extension (pure Python + Triton).")
        _STATUS.update(built=False, reason=msg)
        return []

    def not_buildable(msg: str) -> list[Extension]:
        if REQUIRE:
            _fail(f"{msg}; PLLM_REQUIRE_CUDA_EXT=1 requires the CUDA extension.")
        _warn(f"{msg}: building pllm_kernels without the CUDA extension.")
        _STATUS.update(built=False, reason=msg)
        return []

    try:
        import pybind11
    except ImportError:
        return not_buildable("pybind11 is not installed")

    cuda_home = _find_cuda_home(nvcc)
    if cuda_home is None:
        return not_buildable(f"found nvcc at {nvcc} but not the CUDA toolkit root (set CUDA_HOME)")
    lib_dir = _cuda_lib_dir(cuda_home)
    if lib_dir is None:
        return not_buildable(f"libcudart_static.a not found under {cuda_home}")

    cu_sources = sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    cpp_sources = sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "python_bindings", "*.cpp")))
    if not cu_sources or not cpp_sources:
        return not_buildable("no csrc/*.cu or python_bindings/*.cpp sources found")
    headers = sorted(
        _rel(p)
        for pat in ("csrc/*.h", "csrc/*.cuh", "csrc/include/**/*.cuh", "csrc/include/**/*.h")
        for p in glob.glob(os.path.join(ROOT, pat), recursive=True)
    )
    cpp_sources += sorted(_rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))  # the CPU emulator
    cuda_include = _cuda_include_dir(cuda_home)
    if cuda_include is None:
        return not_buildable(f"cuda_runtime.h not found under {cuda_home}")
    archs = _parse_archs()

    ext = Extension(
        EXT_NAME,
        sources=cpp_sources,
        include_dirs=[
            pybind11.get_include(),
            os.path.join(ROOT, "csrc"),
            os.path.join(ROOT, "csrc", "include"),
            cuda_include,  # host-side CUDA headers (fp16 / bf16 conversions) for the CPU emulator
        ],
        # .cu files and headers as depends: triggers rebuilds and puts them into the sdist.
        depends=cu_sources + headers,
        define_macros=[("PLLM_VERSION_STR", f'"{VERSION}"')],
        # -ffp-contract=off: the emulator must not fuse a*b+c where the device code does not (bitwise results).
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off", "-Wno-unknown-pragmas"],
        extra_link_args=[
            f"-L{lib_dir}",
            "-lcudart_static",
            "-ldl",
            "-lrt",
            "-lpthread",
            # keep the static cudart symbols private to _C (no clash with torch's libcudart)
            "-Wl,--exclude-libs,ALL",
        ],
        language="c++",
    )
    ext.cuda_sources = cu_sources
    ext.cuda_archs = archs
    ext.cuda_include_dirs = ["csrc", "csrc/include"]
    ext.nvcc = nvcc
    print(
        f"[pllm_kernels setup] building {EXT_NAME}: nvcc={nvcc} CUDA_HOME={cuda_home} archs={archs} "
        f"python={sysconfig.get_python_version()}",
        file=sys.stderr,
        flush=True,
    )
    return [ext]


setup(
    ext_modules=_make_extensions(),
    cmdclass={"build_ext": CudaBuildExt},
)
