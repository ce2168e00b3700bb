"""Chat templating with an exact loss mask, for the chat templates models actually ship.

What is trained is each assistant reply plus the one end-of-turn token that follows it (`<|im_end|>`,
`<|eot_id|>`, `</s>`, `<end_of_turn>`, `<|end|>`, ...): a known anchor bug leaves that token masked so
the model never learns to stop. Every reply is located in the full rendering by its own text, in
order; where the same text occurs more than once (a user quoting the reply, say), the rendering of
the conversation up to that turn says which occurrence is the turn, tolerating the whitespace that
templates written with `{% %}` tags on separate lines add or drop. Templates with `{% generation %}`
markers give each turn's span directly; a span is cut after its end-of-turn token and never widened
past one.

Template quirks are detected and reported, never silently fixed:
- a template that refuses a system turn gets it merged into the first user turn;
- a template that drops the system prompt (Mistral's, which puts it on the last user turn only, so a
  conversation ending with the assistant loses it) gets it folded into the first user turn;
- a template that writes BOS (possibly after leading whitespace) while the tokenizer adds it again
  gets one BOS, at the start.
A template that still cannot be handled (it rewrites replies, say) is refused with a message that
says what it does. The first rows' masks are decoded back and checked against the replies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
VERIFY_ROWS = 64  # rows whose mask is decoded back and compared with their replies
CHUNK = 1024  # rows rendered and tokenized per batch


class TemplateError(ValueError):
    """The template cannot render this data; the message names the row and what to do."""


class RowError(ValueError):
    """A malformed row: quarantined with this reason, never trained on."""


@dataclass
class Quirks:
    """What was adjusted, counted for the report."""

    system_merged: int = 0  # the template refuses a system role: merged into the first user turn
    system_folded: int = 0  # the template drops (or moves) the system prompt: folded into the first user turn
    double_bos_removed: int = 0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def to_messages(row: dict) -> list[dict]:
    """The conversation of an SFT row: `messages`, or `prompt` + `response`. Raises RowError."""
    if row.get("messages") is not None:
        messages = list(row["messages"])
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise RowError("no `messages`, and not a `prompt` + `response` pair")
    check_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise RowError("the conversation does not end with an assistant turn")
    return messages


def check_messages(messages: list) -> None:
    if not messages:
        raise RowError("empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"turn {i}: needs `role` and `content`")
        if m["role"] not in ROLES:
            raise RowError(f"turn {i}: unknown role '{m['role']}' (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise RowError(f"turn {i}: content is {type(m['content']).__name__}, not text")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"turn {i}: empty assistant turn")


def _fold_system(messages: list[dict], row_id: str, why: str) -> list[dict]:
    system, rest = messages[0], messages[1:]
    if not rest or rest[0]["role"] != "user":
        raise RowError(f"a system turn not followed by a user turn, and {why}")
    return [{"role": "user", "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]


@dataclass
class Layout:
    """A rendered row: its text, each assistant turn as (content start, content end) offsets, its id."""

    text: str
    turns: list[tuple[int, int]]
    row_id: str


class ChatEncoder:
    """Renders and tokenizes conversations with one tokenizer and chat template."""

    def __init__(self, tokenizer, chat_template: str | None = None, system_prompt: str | None = None):
        self.tok = tokenizer
        self.template = chat_template or tokenizer.chat_template
        if not self.template:
            raise TemplateError(
                "the student tokenizer has no chat template: use an instruct/chat variant of the model, add "
                "`chat_template` to its tokenizer_config.json, or set template.chat_template to a Jinja file")
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("a fast tokenizer (offset mapping) is required to build the loss mask")
        self.system_prompt = system_prompt
        import re

        self.has_generation_markers = bool(re.search(r"\{%-?\s*generation\s*-?%\}", self.template))
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.quirks = Quirks()
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self._compiled = _compile_jinja_template(self.template)
        self._template_vars = dict(tokenizer.special_tokens_map)
        self._system_supported: bool | None = None
        self._verified = 0

    # ------------------------------------------------------------------ rendering

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # The compiled template rendered directly, with the variables apply_chat_template passes: the same
        # text (the golden tests compare it with apply_chat_template) at a fraction of the per-call overhead.
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._template_vars)

    def render_marked(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendering and the character spans of its `{% generation %}` blocks."""
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        return _render_with_assistant_indices(compiled_template=self._compiled, messages=messages, tools=None,
                                              documents=None, add_generation_prompt=False, **self._template_vars)

    def supports_system(self) -> bool:
        """Whether the template accepts a system turn (else it is folded into the first user turn)."""
        if self._system_supported is None:
            probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "a"}]
            try:
                self.render(probe)
                self._system_supported = True
            except Exception:  # jinja's raise_exception: the template refuses a system turn
                self._system_supported = False
        return self._system_supported

    def prepare(self, messages: list[dict], row_id: str) -> tuple[list[dict], str]:
        """Messages with the configured system prompt (merged or folded into the first user turn where
        the template refuses or drops it), and their full rendering."""
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if messages[0]["role"] == "system" and not self.supports_system():
            messages = _fold_system(messages, row_id, "the template has no system role")
            self.quirks.system_merged += 1
            self.quirks.note("the chat template rejects a system role: system turns were merged into the first "
                             "user turn")
        try:
            full = self.render(messages)
        except Exception as e:
            raise TemplateError(f"row {row_id}: the chat template refused this conversation: {e}") from None
        if messages[0]["role"] == "system" and messages[0]["content"].strip() not in full:
            messages = _fold_system(messages, row_id, "the template drops the system prompt")
            self.quirks.system_folded += 1
            self.quirks.note("the chat template drops the system prompt in these conversations (it puts it on the "
                             "last user turn only, say): it was folded into the first user turn")
            full = self.render(messages)
        return messages, full

    # ------------------------------------------------------------------ SFT

    def encode(self, messages: list[dict], row_id: str) -> tuple[list[int], list[int]]:
        """Token ids and the assistant mask (content + end-of-turn of every assistant turn)."""
        return self.encode_many([(messages, row_id)])[0]

    def encode_many(self, rows: list[tuple[list[dict], str]]) -> list[tuple[list[int], list[int]]]:
        """`encode` for many conversations: rendered one by one, tokenized in batches."""
        out = []
        for start in range(0, len(rows), CHUNK):
            out += self.tokenize_layouts([self.layout(m, row_id) for m, row_id in rows[start:start + CHUNK]])
        return out

    def layout(self, messages: list[dict], row_id: str) -> Layout:
        """The row rendered and its assistant turns located: everything but tokenizing."""
        messages, full = self.prepare(messages, row_id)
        blocks = None
        if self.has_generation_markers:
            full, blocks = self.render_marked(messages)
        return Layout(full, self._assistant_turns(messages, full, row_id, blocks), row_id)

    def tokenize_layouts(self, layouts: list[Layout]) -> list[tuple[list[int], list[int]]]:
        """Tokenize rendered rows in one batch and mark each turn's content and end-of-turn token."""
        return self.masks(layouts, self.tokenize_texts([lay.text for lay in layouts]))

    def tokenize_texts(self, texts: list[str]) -> list:
        """The Rust tokenizer's own batch call (it releases the GIL, so chunks can be tokenized on other
        threads): ids and offsets without transformers building a dict per row."""
        return self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=True) if texts else []

    def masks(self, layouts: list[Layout], encodings: list) -> list[tuple[list[int], list[int]]]:
        """(ids, mask) per row from its layout and its tokenization."""
        out = []
        for lay, encoding in zip(layouts, encodings, strict=True):
            ids = encoding.ids
            skip = self._leading_bos(ids)
            mask = self._mask(ids, encoding, lay)
            if skip:
                ids, mask = ids[skip:], mask[skip:]
            if self._verified < VERIFY_ROWS:
                self._verify(ids, mask, [lay.text[a:b] for a, b in lay.turns], lay.row_id)
            out.append((ids, mask))
        return out

    def _verify(self, ids: list[int], mask: list[int], replies: list[str], row_id: str) -> None:
        """Decode what is trained and check it is the replies, each followed by one end-of-turn token."""
        trained = self.tok.decode([i for i, m in zip(ids, mask, strict=True) if m and i not in self.special_ids])
        eots = sum(1 for i, m in zip(ids, mask, strict=True) if m and i in self.special_ids)
        if "".join(trained.split()) != "".join("".join(replies).split()) or eots > len(replies):
            raise TemplateError(f"row {row_id}: the loss mask does not match the assistant turns "
                                f"(trained {trained!r}); this template needs {{% generation %}} markers")
        self._verified += 1

    def _is_blank(self, token_id: int) -> bool:
        return token_id not in self.special_ids and not self.tok.decode([token_id]).strip()

    def _mask(self, ids: list[int], encoding, lay: Layout) -> list[int]:
        """Each turn's content tokens (those holding its first to its last character), then its
        end-of-turn: the special token that follows the content with nothing but whitespace between."""
        mask = [0] * len(ids)
        for start, end in lay.turns:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None or last is None:
                raise TemplateError(f"row {lay.row_id}: an assistant turn maps to no token")
            mask[first:last + 1] = [1] * (last + 1 - first)
            t = last + 1
            while t < len(ids) and ids[t] not in self.special_ids:
                a, b = encoding.token_to_chars(t)
                if lay.text[a:b].strip():
                    break
                t += 1
            if t < len(ids) and ids[t] in self.special_ids:
                mask[t] = 1
        return mask

    def _assistant_turns(self, messages: list[dict], full: str, row_id: str,
                         blocks: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """(start, end) character offsets of each assistant turn's content in `full`, in order."""
        turns: list[tuple[int, int]] = []
        replies = [(i, m["content"].strip()) for i, m in enumerate(messages) if m["role"] == "assistant"]
        if blocks is not None and len(blocks) != len(replies):
            raise TemplateError(f"row {row_id}: the template's {{% generation %}} markers wrap {len(blocks)} spans for "
                                f"{len(replies)} assistant turns; each assistant reply needs exactly one")
        pos = 0
        for n, (i, content) in enumerate(replies):
            floor = max(pos, blocks[n][0]) if blocks else pos
            at = full.find(content, floor)
            if at < 0:
                raise TemplateError(
                    f"row {row_id}: the chat template rewrites assistant turn {i}: its text is not in the rendering "
                    "(the template changes replies, e.g. strips reasoning before `</think>`, changes case or "
                    "reformats them), so the tokens to train cannot be found; use a template that keeps replies as "
                    "written")
            if blocks is None and full.find(content, at + 1) >= 0:  # the same text again: which one is the turn?
                at = full.find(content, max(floor, self._turn_start(messages, i, full)))
            turns.append((at, at + len(content)))
            pos = at + len(content)
        return turns

    def _turn_start(self, messages: list[dict], i: int, full: str) -> int:
        """Where turn i can start: as far as the rendering of the conversation up to it (with the
        generation prompt, trailing whitespace ignored) agrees with the full rendering."""
        prefix = self.render(messages[:i], add_generation_prompt=True).rstrip()
        return len(os.path.commonprefix([prefix, full]))

    def _leading_bos(self, ids: list[int]) -> int:
        """How many leading tokens to drop so the sequence holds one BOS: the template wrote BOS (maybe
        after whitespace: `\\n<s>`) and the tokenizer added it again."""
        bos = self.tok.bos_token_id
        if bos is None or not ids or ids[0] != bos:
            return 0
        j = 1
        while j < len(ids) and self._is_blank(ids[j]):
            j += 1
        if j >= len(ids) or ids[j] != bos:
            return 0
        self.quirks.double_bos_removed += 1
        self.quirks.note("the chat template writes BOS and the tokenizer adds it again: one was removed" if j == 1 else
                         "the chat template writes whitespace, then BOS, and the tokenizer adds BOS too: the added "
                         "BOS and the whitespace were removed")
        return j

    # ------------------------------------------------------------------ preference (DPO)

    def encode_preference(self, row: dict, row_id: str) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, chosen ids, rejected ids), split where TRL's DPO trainer expects them."""
        prompt = row.get("prompt")
        prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        check_messages(prompt_msgs)
        if prompt_msgs[-1]["role"] != "user":
            raise RowError("the preference prompt must end with a user turn")
        out = []
        for side in ("chosen", "rejected"):
            reply = row.get(side)
            reply = reply[-1]["content"] if isinstance(reply, list) and reply else reply
            if not isinstance(reply, str) or not reply.strip():
                raise RowError(f"`{side}` is missing, empty or not text")
            out.append({"role": "assistant", "content": reply})
        msgs = self.prepare([*prompt_msgs, out[0]], row_id)[0][:-1]
        prompt_text = self.render(msgs, add_generation_prompt=True)
        prompt_ids = self.tok(prompt_text, add_special_tokens=True)["input_ids"]
        prompt_ids = prompt_ids[self._leading_bos(prompt_ids):]
        replies = []
        for reply in out:
            full = self.render([*msgs, reply])
            if not full.startswith(prompt_text):
                raise TemplateError(f"row {row_id}: the template renders the prompt differently once a reply is added")
            replies.append(self.tok(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
        return list(prompt_ids), replies[0], replies[1]
