"""A small table type and its two renderings: Markdown (GitHub) and LaTeX (booktabs).

Builders in ``results.report`` decide content, bold and footnote marks; this module only
renders, so the same table reads the same in a README and in a paper.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LATEX_PREAMBLE = r"""\documentclass{article}
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage{booktabs}
\usepackage{graphicx}
\usepackage{amssymb}
"""

ARTICLE_LINEWIDTH_PT = 345.0  # \linewidth of the standard article class, one column

# Characters that LaTeX treats specially, and the few non-ASCII symbols our labels use.
_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
    "α": r"$\alpha$", "·": r"$\cdot$", "…": r"\dots{}", "Δ": r"$\Delta$", "±": r"$\pm$",
    "†": r"\textsuperscript{\dag}", "‡": r"\textsuperscript{\ddag}", "×": r"$\times$",
    "–": "--", "—": "---", "−": "$-$", "≤": r"$\leq$", "≥": r"$\geq$", "σ": r"$\sigma$",
    "✓": r"$\checkmark$",
}


def latex_escape(text: str) -> str:
    """Plain text (possibly with the symbols above) as LaTeX source."""
    text = str(text).replace("--", "-\x00-")  # keep "--set" two hyphens, not an en dash
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text).replace("\x00", "{}")


def _markdown_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


@dataclass
class Cell:
    """One cell: its text, whether it is bold, and a footnote mark shown after it."""

    text: str
    bold: bool = False
    mark: str = ""


@dataclass
class Table:
    """Rows of cells under column names, optionally with spanning headers over the value
    columns (``groups``: (title, width) pairs covering the columns after the label columns)."""

    name: str  # file stem and LaTeX label
    caption: str
    columns: list[str]
    rows: list[list[Cell]]
    label_columns: int = 1
    groups: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rules_before: set[int] = field(default_factory=set)  # rows that open a new section

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.name}: row {i} has {len(row)} cells for {len(self.columns)} columns")
        if self.groups and sum(w for _, w in self.groups) != len(self.columns) - self.label_columns:
            raise ValueError(f"table {self.name}: header groups span {sum(w for _, w in self.groups)} columns, "
                             f"not the {len(self.columns) - self.label_columns} value columns")

    def header_names(self) -> list[str]:
        """Flat column names (a group's title prefixed), as Markdown and data frames use them."""
        names = list(self.columns[: self.label_columns])
        i = self.label_columns
        for title, width in self.groups or [("", len(self.columns) - self.label_columns)]:
            names += [f"{title} {c}".strip() for c in self.columns[i: i + width]]
            i += width
        return names

    def to_markdown(self) -> str:
        """GitHub Markdown: the caption as a paragraph, the table, then the notes."""
        def cell(c: Cell) -> str:
            text = _markdown_escape(c.text)
            return (f"**{text}**" if c.bold and text else text) + c.mark

        lines = [f"**{self.name}.** {self.caption}", ""]
        lines.append("| " + " | ".join(_markdown_escape(h) for h in self.header_names()) + " |")
        lines.append("|" + "|".join([":---"] * self.label_columns
                                    + ["---:"] * (len(self.columns) - self.label_columns)) + "|")
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"{n}  " for n in self.notes]
        return "\n".join(lines) + "\n"

    def estimated_width_pt(self) -> float:
        """Natural width of the tabular in \\small type: ~5pt a character, 12pt column padding."""
        widths = [max([len(name)] + [len(r[i].text + r[i].mark) for r in self.rows])
                  for i, name in enumerate(self.columns)]
        return sum(5.0 * w + 12.0 for w in widths)

    def to_latex(self, fit_width: bool | None = None) -> str:
        """A ``table`` float with a booktabs ``tabular``: ``\\input`` it into a paper that loads
        booktabs, graphicx and amssymb (``LATEX_PREAMBLE``). ``fit_width`` scales the tabular to the line
        width (default: when its estimated natural width exceeds an article's line)."""
        def cell(c: Cell) -> str:
            text = latex_escape(c.text)
            mark = latex_escape(c.mark) if c.mark else ""
            return (rf"\textbf{{{text}}}" if c.bold and text else text) + mark

        ncol = len(self.columns)
        spec = "l" * self.label_columns + "c" * (ncol - self.label_columns)
        fit = self.estimated_width_pt() > ARTICLE_LINEWIDTH_PT if fit_width is None else fit_width
        out = [r"\begin{table}[t]", r"\centering", r"\small",
               rf"\caption{{{latex_escape(self.caption)}}}", rf"\label{{tab:{self.name}}}"]
        if fit:
            out.append(r"\resizebox{\linewidth}{!}{%")
        out += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
        if self.groups:
            heads, rules, col = [""] * self.label_columns, [], self.label_columns + 1
            for title, width in self.groups:
                heads.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(title)}}}" if width > 1
                             else latex_escape(title))
                if title:
                    rules.append(rf"\cmidrule(lr){{{col}-{col + width - 1}}}")
                col += width
            out.append(" & ".join(heads) + r" \\")
            if rules:
                out.append(" ".join(rules))
        out.append(" & ".join(latex_escape(c) for c in self.columns) + r" \\")
        out.append(r"\midrule")
        for i, row in enumerate(self.rows):
            if i in self.rules_before and i > 0:
                out.append(r"\midrule")
            out.append(" & ".join(cell(c) for c in row) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}" + ("}" if fit else "")]
        if self.notes:
            out.append(r"\par\smallskip")
            out.append(r"{\footnotesize " + r"\par ".join(latex_escape(n) for n in self.notes) + r"\par}")
        out.append(r"\end{table}")
        return "\n".join(out) + "\n"


def latex_document(tables: list[Table]) -> str:
    """A standalone document with every table, for a quick ``pdflatex`` look."""
    body = "\n".join(t.to_latex() for t in tables)
    return LATEX_PREAMBLE + "\\begin{document}\n" + body + "\\clearpage\n\\end{document}\n"
