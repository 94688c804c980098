"""Build steps pyproject.toml cannot express: protobuf/gRPC code generation and the C++ kernel."""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
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
kernel = Pybind11Extension(
    "cpu_attention_worker._kernel",
    sorted(str(p.relative_to(ROOT)) for p in KERNEL_DIR.glob("*.cpp")),
    depends=sorted(str(p.relative_to(ROOT)) for p in KERNEL_DIR.glob("*.h")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[kernel], cmdclass={"build_py": BuildPyWithProtos})
