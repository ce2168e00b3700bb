"""Chat templating with an exact loss mask, for any chat template.

The assistant spans come from the template itself: where it has `{% generation %}` markers,
transformers reports them; otherwise each assistant turn is located by rendering the conversation
up to that turn with the generation prompt and diffing prefixes against the full rendering. The
trained tokens of a turn are its content plus the special token right after it (only whitespace
between): its end-of-turn (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, `<|end|>`), which a
known anchor bug leaves masked so the model never learns to stop. Template quirks are detected and reported, never
silently fixed: a template that refuses a system turn gets it merged into the first user turn, a
template that puts BOS in the text while the tokenizer adds it again gets one BOS removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
VERIFY_ROWS = 64  # rows whose mask is decoded back and compared with their replies


class TemplateError(ValueError):
    """The template cannot render this data; the message names the row and what to do."""


class RowError(ValueError):
    """A malformed row: quarantined with this reason, never trained on."""


@dataclass
class Quirks:
    """What was adjusted, counted for the report."""

    system_merged: int = 0
    double_bos_removed: int = 0
    notes: list[str] = field(default_factory=list)


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
        self.has_generation_markers = "{% generation %}" in self.template or "{%- generation %}" in self.template
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

    def _supports_system(self) -> bool:
        if self._system_supported is None:
            probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                     {"role": "assistant", "content": "a"}]
            try:
                self.render(probe)
                self._system_supported = True
            except Exception:  # jinja's raise_exception: the template refuses a system turn
                self._system_supported = False
                self.quirks.notes.append(
                    "the chat template rejects a system role: system turns were merged into the first user turn")
        return self._system_supported

    def prepare(self, messages: list[dict], row_id: str) -> tuple[list[dict], str]:
        """Messages with the configured system prompt (merged into the first user turn where the
        template has no system role), and their full rendering."""
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if messages[0]["role"] == "system" and not self._supports_system():
            system, rest = messages[0], messages[1:]
            if not rest or rest[0]["role"] != "user":
                raise RowError("a system turn not followed by a user turn, and the template has no system role")
            rest = [{"role": "user", "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]
            self.quirks.system_merged += 1
            messages = rest
        try:
            return messages, self.render(messages)
        except Exception as e:
            raise TemplateError(f"row {row_id}: the chat template refused this conversation: {e}") from None

    # ------------------------------------------------------------------ SFT

    def encode(self, messages: list[dict], row_id: str) -> tuple[list[int], list[int]]:
        """Token ids and the assistant mask (content + end-of-turn of every assistant turn)."""
        return self.encode_many([(messages, row_id)])[0]

    def encode_many(self, rows: list[tuple[list[dict], str]]) -> list[tuple[list[int], list[int]]]:
        """`encode` for many conversations: rendered one by one, tokenized in one batch."""
        if self.has_generation_markers:
            return [self._encode_marked(self.prepare(m, row_id)[0], row_id) for m, row_id in rows]
        return self.tokenize_layouts([self.layout(m, row_id) for m, row_id in rows])

    def layout(self, messages: list[dict], row_id: str) -> tuple[str, list[tuple[int, int]], str]:
        """(rendered text, assistant turns as character offsets, row id): everything but tokenizing."""
        messages, full = self.prepare(messages, row_id)
        return full, self._assistant_turns(messages, full, row_id), row_id

    def tokenize_layouts(self, layouts: list) -> list[tuple[list[int], list[int]]]:
        """Tokenize rendered rows in one batch and mark each turn's content and end-of-turn token."""
        if not layouts:
            return []
        batch = self.tok([text for text, _, _ in layouts], add_special_tokens=True, return_offsets_mapping=True)
        out = []
        for (text, turns, row_id), ids, offsets in zip(layouts, batch["input_ids"], batch["offset_mapping"], strict=True):
            skip = self._double_bos(ids)
            ids, offsets = list(ids[skip:]), offsets[skip:]
            mask = self._mask(ids, offsets, text, turns, row_id)
            if self._verified < VERIFY_ROWS:
                self._verify(ids, mask, [text[a:b].strip() for a, b in turns], row_id)
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

    def _mask(self, ids: list[int], offsets, text: str, turns: list[tuple[int, int]], row_id: str) -> list[int]:
        """One pass over the tokens: each turn's content tokens, then its end-of-turn: the special
        token that follows the content with nothing but whitespace in between."""
        mask = [0] * len(ids)
        t = 0
        for start, content_end in turns:
            while t < len(ids) and offsets[t][0] < start:
                t += 1
            first = t
            while t < len(ids) and offsets[t][0] < content_end:
                mask[t] = int(offsets[t][1] > offsets[t][0])
                t += 1
            if not any(mask[first:t]):
                raise TemplateError(f"row {row_id}: an assistant turn maps to no token")
            while t < len(ids) and ids[t] not in self.special_ids and not text[offsets[t][0]:offsets[t][1]].strip():
                t += 1
            if t < len(ids) and ids[t] in self.special_ids:
                mask[t] = 1
                t += 1
        return mask

    def _assistant_turns(self, messages: list[dict], full: str, row_id: str) -> list[tuple[int, int]]:
        """(start, content end) character offsets of each assistant turn in `full`: the turn starts
        where the conversation rendered up to it with the generation prompt ends."""
        turns = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(prefix):
                raise TemplateError(
                    f"row {row_id}: the chat template renders the history before assistant turn {i} differently once "
                    "later turns are added, so its span cannot be located by prefix; use a template with "
                    "{% generation %} markers")
            content = m["content"].strip()
            at = full.find(content, len(prefix))
            if at < 0:
                raise TemplateError(f"row {row_id}: assistant turn {i} is not where the template should put it")
            turns.append((len(prefix), at + len(content)))
        return turns

    def _encode_marked(self, messages: list[dict], row_id: str) -> tuple[list[int], list[int]]:
        """Templates with {% generation %} markers: transformers' assistant mask, plus each turn's
        end-of-turn token when the markers stop short of it."""
        out = self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if not any(mask):
            raise TemplateError(f"row {row_id}: the template's {{% generation %}} markers cover no token")
        marked = list(mask)
        for t in range(1, len(ids)):
            # widen only a span that stops at content: one that already ends in its end-of-turn (Llama 3.2's
            # `{% generation %}` around content + '<|eot_id|>') is followed by the next turn's header
            if marked[t - 1] and not marked[t] and ids[t] in self.special_ids and ids[t - 1] not in self.special_ids:
                mask[t] = 1
        return ids, mask

    def _double_bos(self, ids: list[int]) -> int:
        """1 when the template wrote BOS and the tokenizer added it again (one is dropped), else 0."""
        bos = self.tok.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            if not self.quirks.double_bos_removed:
                self.quirks.notes.append("the chat template writes BOS and the tokenizer adds it again: one was removed")
            self.quirks.double_bos_removed += 1
            return 1
        return 0

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
        prompt_ids = prompt_ids[self._double_bos(prompt_ids):]
        replies = []
        for reply in out:
            full = self.render([*msgs, reply])
            if not full.startswith(prompt_text):
                raise TemplateError(f"row {row_id}: the template renders the prompt differently once a reply is added")
            replies.append(self.tok(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
        return list(prompt_ids), replies[0], replies[1]
