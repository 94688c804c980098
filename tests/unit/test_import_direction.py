"""Imports run one way: the tools (apex_tools) sit on the services, the services on the ground floor (apex_serve).
Read from the source of every module, lazy imports inside functions included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GROUND_FLOOR = "apex_serve"
SERVICES = ("gateway", "gpu_worker", "cpu_attention_worker", "scheduler_service", "profiler_service")
TOOLS = "apex_tools"
# The one deliberate crossing between services: the gpu_worker drives the CPU worker's shared-memory data plane
# through that worker's own client (DESIGN §2, data plane).
ALLOWED_CROSSINGS = {
    ("gpu_worker", "cpu_attention_worker.client"),
    ("gpu_worker", "cpu_attention_worker.data_plane"),
}
PROJECT_PACKAGES = (GROUND_FLOOR, TOOLS, *SERVICES)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import of a project package in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PROJECT_PACKAGES]
    return found


def violations(package: str) -> list[str]:
    """Every import in the package that runs against the floors, as `file:line imports module`."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top == package:
                continue
            if package == GROUND_FLOOR:
                allowed = False  # the ground floor imports no service and no tool
            elif package in SERVICES:
                allowed = top == GROUND_FLOOR or any(
                    package == owner and (module == crossing or module.startswith(crossing + "."))
                    for owner, crossing in ALLOWED_CROSSINGS)
            else:
                allowed = True
            if not allowed:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


def test_imported_modules_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom apex_serve import rpc\n\ndef f():\n    import gateway.config\n"
                      "    from apex_tools.cli import main\n")
    assert imported_modules(source) == [
        (2, "apex_serve"), (2, "apex_serve.rpc"), (5, "gateway.config"), (6, "apex_tools.cli"),
        (6, "apex_tools.cli.main"),
    ]


def test_the_ground_floor_imports_no_service_and_no_tool() -> None:
    found = violations(GROUND_FLOOR)
    assert found == [], "\n".join(found)


def test_each_service_imports_only_the_ground_floor_and_itself() -> None:
    found = [v for service in SERVICES for v in violations(service)]
    assert found == [], "\n".join(found)


def test_the_named_crossing_is_the_only_one_and_is_used() -> None:
    """The exception list names imports that exist: a stale exception would hide nothing and mislead."""
    used = {(package, module) for package in SERVICES
            for path in (ROOT / package).rglob("*.py") for _, module in imported_modules(path)}
    assert ALLOWED_CROSSINGS <= used
