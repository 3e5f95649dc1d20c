"""The report page: one self-contained HTML file (inline CSS, figures as data: URIs, no script, no external link),
rendered from the jinja2 templates in templates/ with autoescape on, so a setting or method named `<b>&"x"` is
shown as text, never as markup.

Example::

    >>> render("cost.html", rows=[])
    Markup('<p class="notrun">Not run: no run has a summary.json yet.</p>')
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup


def fmt(x) -> str:
    """A table cell as text: None as a dash, booleans as yes/no, floats to 4 significant digits (exponent below
    1e-4: 2e-05, 0.0002)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _environment() -> Environment:
    # StrictUndefined: a template asking for a field the section did not provide fails loudly, not blank
    env = Environment(
        loader=PackageLoader("lorascope.report", "templates"),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


ENV = _environment()


def render(template: str, **context) -> Markup:
    """One template rendered to HTML that the page template embeds as is (it was escaped when rendered)."""
    return Markup(ENV.get_template(template).render(**context))
