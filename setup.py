"""Build steps pyproject.toml cannot express: protobuf/gRPC code generation and the C++ kernel."""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"


def generate_protos() -> None:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py next to apex_serve/v1/__init__.py."""
    from grpc_tools import protoc  # build-time dependency only

    include = Path(protoc.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


KERNEL_DIR = ROOT / "cpu_attention_worker" / "csrc"
# Instruction-set flags per kernel file (by name suffix); the code picks one at run time, so
# the module runs on any x86-64. Never -march=native.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"],
    "_avx512bf16.cpp": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
}


class BuildExtWithIsaFlags(build_ext):
    def build_extensions(self) -> None:
        compile_one = self.compiler._compile

        def compile_with_isa(obj, src, ext, cc_args, extra_postargs, pp_opts):  # noqa: ANN001, ANN202
            flags = next((f for suffix, f in ISA_FLAGS.items() if src.endswith(suffix)), [])
            compile_one(obj, src, ext, cc_args, [*extra_postargs, *flags], pp_opts)

        self.compiler._compile = compile_with_isa
        super().build_extensions()


kernel = Pybind11Extension(
    "cpu_attention_worker._kernel",
    sorted(str(p.relative_to(ROOT)) for p in KERNEL_DIR.glob("*.cpp")),
    depends=sorted(str(p.relative_to(ROOT)) for p in KERNEL_DIR.glob("*.h")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[kernel], cmdclass={"build_py": BuildPyWithProtos, "build_ext": BuildExtWithIsaFlags})
