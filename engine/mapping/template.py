"""``template:`` fields: Jinja2, in a sandbox, for the rare computed string that an expression does
not say well (a loop over repetitions, a format with several optional parts).

The template is checked when the mapping is loaded, like an expression: its syntax, every HL7 path
(read with ``field('PID-5.2')``, a literal path, so ``check`` can verify it), and every name it uses
(``channel``, ``timezone``, ``control_id``, ``sending_facility``, ``message_type`` and the fact's fields
computed before it). It renders in Jinja2's immutable sandbox: no attribute of Python objects, no
imports, ``range`` bounded; a template that fails at run time is a conversion error of its field
(``invalid: fail`` or ``skip`` as for any other value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.mapping.convert import ConversionError

_ENV = ImmutableSandboxedEnvironment(autoescape=False, undefined=StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
READER = "field"


class TemplateProblem(Exception):
    """A template that cannot be used; the text says why (and where, for syntax errors)."""


def literal_paths(source: str) -> tuple[list[str], set[str]]:
    """The paths a template reads with ``field('...')`` and the other names it uses; raises
    TemplateProblem for a syntax error, an unknown filter or test, or a ``field`` call whose
    argument is not one quoted path."""
    try:
        ast = _ENV.parse(source)
        names = meta.find_undeclared_variables(ast) - {READER}  # compiles: finds unknown filters and tests
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"template: {exc.message} (template line {exc.lineno})") from None
    except TemplateError as exc:
        raise TemplateProblem(f"template: {exc}") from None
    paths: list[str] = []
    for call in ast.find_all(nodes.Call):
        if isinstance(call.node, nodes.Name) and call.node.name == READER:
            arg = call.args[0] if len(call.args) == 1 else None
            if (arg is None or call.kwargs or call.dyn_args or call.dyn_kwargs or not isinstance(arg, nodes.Const)
                    or not isinstance(arg.value, str)):
                raise TemplateProblem(f"template: {READER}() takes one HL7 path in quotes, e.g. {READER}('PID-5.1')")
            paths.append(arg.value)
    return paths, names


def compile_template(source: str, readers: dict[str, Callable[[Any], Any]],
                     names: dict[str, Callable[[Any], Any]]) -> Callable[[Any], str | None]:
    """The field's compute function: render with ``field(path)`` reading ``readers[path]`` and each
    name from ``names``; surrounding blanks dropped, empty gives None."""
    template = _ENV.from_string(source)

    def render(sc: Any) -> str | None:
        def field(path: str) -> Any:
            v = readers[path](sc)
            return "" if v is None else v

        values = {n: ("" if (v := get(sc)) is None else v) for n, get in names.items()}
        try:
            out = template.render(values, field=field).strip()
        except TemplateError as exc:  # names and attributes, never values
            raise ConversionError(f"template: {exc}") from None
        except Exception as exc:  # e.g. int('Doe') in a template: the type only, its text may hold the value
            raise ConversionError(f"template failed: {type(exc).__name__}") from None
        return out or None

    return render
