"""Answers that always parse: a JSON Schema compiled to a llama.cpp grammar (GBNF), applied in our own sampling loop.

The schema → GBNF translation is llama-cpp-python's (`llama_cpp.llama_grammar.SchemaConverter`); we add integer
bounds (`minimum`/`maximum`, which it leaves open: a box coordinate must stay within 0–1000) and the frame
around the JSON that a recipe asks for (a thinking trace, free reasoning, "Final Answer: ```json … ```").
Sampling goes through llama.cpp's own grammar sampler (`llama_sampler_init_grammar`), token by token.

A free-text prelude (thinking, reasoning) could use up the whole `--max-tokens` and leave the JSON unwritten;
a `Constraint` therefore keeps `reserve` tokens for the JSON: when only that many are left and the answer is
still in its prelude, the sampler switches to a grammar that closes the prelude and starts the JSON at once.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.errors import InputError, MedgemmaError

THINK_OPEN, THINK_CLOSE = "<unused94>", "<unused95>"  # MedGemma's thinking markers (special tokens)
THOUGHT_RULES = f"thought ::= {THINK_OPEN} thought-text {THINK_CLOSE}\nthought-text ::= [^\\x01]*"
REASONING_RULE = "reasoning ::= [^`]*"  # free text before the fenced JSON; its first backtick opens the fence
FENCED_RULE = 'fenced ::= "Final Answer:" " "? "```json" "\\n"? answer "\\n"? "```"'
MAX_SCHEMA_BYTES = 1 << 20
# A character inside a JSON string (RFC 8259 §7): the converter's own rule lets raw control characters through,
# which JSON forbids (a random model wrote a raw \x16 and json.loads refused the answer)
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


def load_schema(path: Path) -> dict[str, Any]:
    """A JSON Schema file, checked to compile (one line naming the file if not)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SCHEMA_BYTES:
            raise InputError(path, f"over {MAX_SCHEMA_BYTES >> 20} MB; not a schema")
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise InputError(path, "a JSON Schema is a JSON object")
    try:
        schema_rules(schema)
    except MedgemmaError as e:
        raise InputError(path, str(e)) from None
    return schema


def digits_between(lo: int, hi: int) -> str:
    """A GBNF expression for the decimal integers lo..hi (0 ≤ lo ≤ hi), without leading zeros."""
    if not 0 <= lo <= hi:
        raise ValueError("0 <= lo <= hi")

    def same_length(a: str, b: str) -> str:  # digit strings of len(a) == len(b), a ≤ x ≤ b
        if not a:
            return ""
        rest = len(a) - 1
        if a[0] == b[0]:
            return f'"{a[0]}" {same_length(a[1:], b[1:])}'.strip()
        if a[1:] == "0" * rest and b[1:] == "9" * rest:  # a whole block of first digits
            return f"[{a[0]}-{b[0]}]" + " [0-9]" * rest
        alts = [f'"{a[0]}" {same_length(a[1:], "9" * rest)}'.strip()]
        if int(b[0]) - int(a[0]) > 1:
            alts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + " [0-9]" * rest)
        alts.append(f'"{b[0]}" {same_length("0" * rest, b[1:])}'.strip())
        return "(" + " | ".join(alts) + ")"

    alts = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = min(hi, 10 ** n - 1)
        alts.append(same_length(str(a), str(b)))
    return "(" + " | ".join(alts) + ")"


def _converter() -> Any:
    from llama_cpp.llama_grammar import SchemaConverter

    class BoundedIntegers(SchemaConverter):
        """llama-cpp-python's converter, with non-negative integer bounds kept in the grammar."""

        def visit(self, schema: Any, name: str) -> Any:
            if (isinstance(schema, dict) and schema.get("type") == "integer" and "enum" not in schema
                    and "const" not in schema and isinstance(schema.get("minimum", 0), int)
                    and isinstance(schema.get("maximum"), int) and 0 <= schema.get("minimum", 0) <= schema["maximum"]):
                rule = digits_between(schema.get("minimum", 0), schema["maximum"]) + " space"
                return self._add_rule(name + "-" if name in ("root", "space") else name or "root", rule)
            return super().visit(schema, name)

    return BoundedIntegers(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def schema_rules(schema: dict[str, Any]) -> str:
    """The GBNF rules of `schema`, its top rule named `answer` (to be framed by a `root`)."""
    conv = _converter()
    try:
        resolved = conv.resolve_refs(json.loads(json.dumps(schema)), "schema")
        top = conv.visit(resolved, "answer")
    except (AssertionError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise MedgemmaError(f"the schema cannot be turned into a grammar ({type(e).__name__}: {e})") from None
    rules = "\n".join(JSON_CHAR if line.startswith("char ::= ") else line
                      for line in conv.format_grammar().splitlines())
    if top != "answer":  # a primitive at the top level keeps its own name
        rules += f"\nanswer ::= {top}"
    return rules


def max_chars(schema: dict[str, Any]) -> int | None:
    """The longest JSON text `schema`'s grammar allows, where it is bounded (for the tokens kept for it)."""
    t = schema.get("type")
    if "const" in schema:
        return len(json.dumps(schema["const"])) + 1
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"]) + 1
    if isinstance(schema.get("anyOf"), list) and schema["anyOf"]:
        sizes = [max_chars(s) if isinstance(s, dict) else None for s in schema["anyOf"]]
        return None if None in sizes else max(n for n in sizes if n is not None)
    if t == "null":
        return len("null") + 1
    if t == "integer" and isinstance(schema.get("maximum"), int) and schema.get("minimum", 0) >= 0:
        return len(str(schema["maximum"])) + 1
    if t == "string" and isinstance(schema.get("maxLength"), int):
        return 6 * schema["maxLength"] + 3  # \uXXXX escapes at worst
    if t == "array" and isinstance(schema.get("maxItems"), int) and isinstance(schema.get("items"), dict):
        item = max_chars(schema["items"])
        return None if item is None else 3 + schema["maxItems"] * (item + 2)
    if t == "object" and isinstance(schema.get("properties"), dict) and schema.get("additionalProperties") is False:
        total = 3
        for k, v in schema["properties"].items():
            if (n := max_chars(v)) is None:
                return None
            total += len(json.dumps(k)) + 3 + n
        return total
    return None


@dataclass(frozen=True)
class Constraint:
    """What the sampler may produce. `closing` (outside a thought) and `closing_in_thought` are grammars that end
    the prelude at once and write the JSON; they take over when `reserve` tokens are left and the answer is still
    in its prelude: inside a thought, or (with `opens_answer`) before that text has appeared."""
    grammar: str
    closing: str | None = None
    closing_in_thought: str | None = None
    reserve: int = 0
    opens_answer: str | None = None

    def in_prelude(self, answer_so_far: str, in_thought: bool) -> bool:
        return in_thought or (self.opens_answer is not None and self.opens_answer not in answer_so_far)


def json_answer(schema: dict[str, Any], think: bool = False, reserve: int = 0) -> Constraint:
    """Only the JSON (after a thinking trace, with `think`)."""
    rules = schema_rules(schema)
    if not think:
        return Constraint(f"root ::= answer\n{rules}")
    return Constraint(f"root ::= thought? answer\n{THOUGHT_RULES}\n{rules}", f"root ::= answer\n{rules}",
                      f"root ::= {THINK_CLOSE} answer\n{rules}", reserve)


def reasoned_answer(schema: dict[str, Any], reserve: int) -> Constraint:
    """The localization recipe's shape: (a thinking trace,) reasoning, then `Final Answer: ```json…``` `."""
    rules = schema_rules(schema)
    return Constraint(f"root ::= thought? reasoning fenced\n{THOUGHT_RULES}\n{REASONING_RULE}\n{FENCED_RULE}\n{rules}",
                      f'root ::= "\\n" fenced\n{FENCED_RULE}\n{rules}',
                      f'root ::= {THINK_CLOSE} "\\n"? fenced\n{FENCED_RULE}\n{rules}', reserve, "`")


def raw_grammar(gbnf: str) -> Constraint:
    """A GBNF grammar as given (root rule `root`), with no budget switch."""
    return Constraint(gbnf)


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarSampler:
    """llama.cpp's grammar sampler over our logits: masks what the grammar forbids, accepts what was chosen."""

    def __init__(self, lib: Any, vocab: Any, n_vocab: int, gbnf: str):
        self._lib = lib
        self._smpl = lib.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self._smpl:
            raise MedgemmaError("llama.cpp could not parse the grammar")
        self._all = np.zeros(n_vocab, _TOKEN_DATA)
        self._all["id"] = np.arange(n_vocab, dtype=np.int32)
        self._one = np.zeros(1, _TOKEN_DATA)

    def _apply(self, arr: np.ndarray) -> None:
        lib = self._lib
        data = lib.llama_token_data_array(arr.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), len(arr), -1,
                                          False)
        lib.llama_sampler_apply(self._smpl, ctypes.byref(data))

    def allows(self, token: int) -> bool:
        self._one["id"], self._one["logit"] = token, 0.0
        self._apply(self._one)
        return bool(np.isfinite(self._one["logit"][0]))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids now at -inf."""
        self._all["logit"] = logits
        self._all["id"] = np.arange(len(logits), dtype=np.int32)  # the sampler may reorder; ids say whose is whose
        self._apply(self._all)
        out = np.full(len(logits), -np.inf, np.float32)
        out[self._all["id"]] = self._all["logit"]
        return out

    def accept(self, token: int) -> None:
        """Only ever a token `allows`/`mask` let through: llama.cpp aborts the process on any other."""
        self._lib.llama_sampler_accept(self._smpl, token)

    def close(self) -> None:
        if self._smpl:
            self._lib.llama_sampler_free(self._smpl)
            self._smpl = None
