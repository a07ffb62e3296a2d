"""Sphinx directives that write pages from the code and the data, so the site cannot drift.

* ``trioserve-options``: the option reference, from the parser ``trioserve --help``
  prints and from :class:`trioserve.config.Config` (:mod:`optionref`). One
  ``.. option::`` per option, so pages link to them with ``{option}`` roles and the
  index lists them.
* ``bench-table KIND``: a table from the benchmark results the charts were drawn from
  (:mod:`benchdata`; KIND is ``summary``, ``side-by-side``, ``cost``, ``cost-steps``,
  ``idle`` or ``runs``). A results file changed since ``docs/charts.py`` drew the
  charts is a warning, hence an error under ``sphinx-build -W``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import benchdata
import optionref
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

LOGGER = logging.getLogger(__name__)


class OptionsDirective(SphinxDirective):
    """The whole option reference: a section per group, an ``option`` per flag."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        result: list[nodes.Node] = []
        for title, intro, members in optionref.grouped_entries():
            section = nodes.section()
            section_id = nodes.make_id(title)
            section["ids"].append(section_id)
            section["names"].append(nodes.fully_normalize_name(title))
            section += nodes.title(text=title)
            self.state.document.note_implicit_target(section, section)
            lines = [intro, ""]
            for entry in members:
                lines += optionref.option_lines(entry)
            section.extend(self.parse_text_to_nodes("\n".join(lines)))
            result.append(section)
        return result


BENCH_TABLES = {
    "summary": benchdata.summary_table,
    "side-by-side": benchdata.side_by_side_table,
    "cost": benchdata.cost_table,
    "idle": benchdata.idle_table,
    "runs": benchdata.runs_table,
}


def _cost_steps_table(results: benchdata.Results) -> tuple[list[str], list[list[str]]]:
    steps = benchdata.cost_steps(results)
    total = sum(steps.values())
    rows = [
        [name, benchdata.number(value), f"{value / total:.0%}"] for name, value in steps.items()
    ]
    return ["part of an HTTP/1.1 hello request", "µs of server CPU", "share"], rows


BENCH_TABLES["cost-steps"] = _cost_steps_table


class BenchTableDirective(SphinxDirective):
    """``.. bench-table:: summary``: a table from the manifest's results files."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {"caption": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        kind = self.arguments[0]
        if kind not in BENCH_TABLES:
            raise self.error(f"unknown bench table {kind!r}: one of {', '.join(BENCH_TABLES)}")
        for problem in benchdata.stale_sources():
            LOGGER.warning(
                "bench results: %s; run: python docs/charts.py %s",
                problem,
                " ".join(entry["path"] for entry in benchdata.read_manifest()["results"]),
                location=self.get_location(),
            )
        paths = benchdata.manifest_paths()
        for path in paths:
            self.env.note_dependency(str(path))
        self.env.note_dependency(str(benchdata.MANIFEST))
        results = benchdata.load([p for p in paths if p.is_file()])
        header, rows = BENCH_TABLES[kind](results)
        lines = [f"```{{list-table}} {self.options.get('caption', '')}", ":header-rows: 1", ""]
        for row in [header, *rows]:
            lines.append(f"* - {row[0] or ' '}")
            lines.extend(f"  - {cell or ' '}" for cell in row[1:])
        lines.append("```")
        return self.parse_text_to_nodes("\n".join(lines))


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("trioserve-options", OptionsDirective)
    app.add_directive("bench-table", BenchTableDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
