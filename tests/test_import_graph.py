"""No two modules of the package need each other, counting imports inside functions and under ``TYPE_CHECKING``.

import-linter's contracts (pyproject.toml, run by ``make lint-imports``) check the layers and cycles between sibling
modules; this checks every module against every other, the way issue 26 counts import cycles."""

from __future__ import annotations

import grimp



def import_cycles(graph) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in graph.modules:
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_the_package_has_no_import_cycle():
    graph = grimp.build_graph("emoreason", exclude_type_checking_imports=False)
    assert import_cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one():
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")  # a -> b -> c -> a
    graph.add_import(importer="pkg.d", imported="pkg.a")  # d only imports into the cycle
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
