"""The real chat templates under tests/templates/ (sources in tests/templates/README.md), each with
the BOS, EOS and end-of-turn token its model's tokenizer publishes, and a small locally trained
byte-level BPE tokenizer carrying that model's special tokens (adding BOS, or not)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
LLAMA3 = dict(bos="<|begin_of_text|>", eos="<|eot_id|>", eot="<|eot_id|>")
QWEN = dict(bos=None, eos="<|im_end|>", eot="<|im_end|>", specials=("<|endoftext|>",))
GEMMA = dict(bos="<bos>", eos="<eos>", eot="<end_of_turn>")
PHI3 = dict(bos="<s>", eos="<|endoftext|>", eot="<|end|>")
MISTRAL_V1 = dict(bos="<s>", eos="</s>", eot="</s>", plain=("[INST]", "[/INST]"))  # text, not control tokens, in v1
MISTRAL_V3 = dict(bos="<s>", eos="</s>", eot="</s>")
DEEPSEEK = dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", eot="<｜end▁of▁sentence｜>")


@dataclass(frozen=True)
class Spec:
    file: str
    bos: str | None
    eos: str
    eot: str  # the end-of-turn token trained after each reply
    specials: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()  # markers that are plain text in this model's vocabulary

    @property
    def name(self) -> str:
        return self.file.removesuffix(".jinja")

    @property
    def template(self) -> str:
        return (TEMPLATES / self.file).read_text(encoding="utf-8")

    def special_tokens(self) -> list[str]:
        """The model's special tokens: those the template writes, plus BOS, EOS and the end-of-turn."""
        found = re.findall(r"<\|[^|>\s]+\|>|<｜[^｜]+｜>|<(?:start|end)_of_(?:turn|image)>|<BOS_TOKEN>|\[/?[A-Z_]+\]",
                           self.template)
        tokens = [t for t in dict.fromkeys([*found, *self.specials, self.eos, self.eot, *([self.bos] if self.bos else [])])
                  if t not in self.plain]
        return tokens


SPECS = (
    Spec("trl-llama3.jinja", **LLAMA3),
    Spec("trl-llama3_1.jinja", **LLAMA3),  # date header, tools
    Spec("trl-llama3_2.jinja", **LLAMA3),  # strftime_now date header, tools
    Spec("trl-llama3_training.jinja", **LLAMA3),  # {% generation %} around content + <|eot_id|>
    Spec("community-llama-3-instruct.jinja", **LLAMA3),  # {% %} tags on separate lines
    Spec("trl-qwen2_5.jinja", **QWEN),  # default system prompt, tools
    Spec("trl-qwen2_5_training.jinja", **QWEN),
    Spec("community-qwen2.5-instruct.jinja", **QWEN),
    Spec("trl-qwen3.jinja", **QWEN),  # reasoning, last_query_index
    Spec("trl-gemma.jinja", **GEMMA),  # Gemma 2: refuses a system role
    Spec("trl-gemma_training.jinja", **GEMMA),  # markers around content + <end_of_turn>\n
    Spec("trl-gemma3.jinja", **GEMMA),  # system folded into the first user turn by the template itself
    Spec("trl-gemma3_training.jinja", **GEMMA),
    Spec("community-gemma-it.jinja", **GEMMA),
    Spec("trl-phi3.jinja", **PHI3),
    Spec("trl-phi3_5.jinja", **PHI3),
    Spec("community-phi-3.jinja", **PHI3),
    Spec("hub-phi-4.jinja", bos="<|endoftext|>", eos="<|im_end|>", eot="<|im_end|>"),
    Spec("hub-mistral-7b-instruct-v0.1-2023.jinja", **MISTRAL_V1),  # refuses a system role
    Spec("hub-mistral-7b-instruct-v0.1.jinja", **MISTRAL_V1),  # system into the first user turn
    Spec("community-mistral-instruct.jinja", **MISTRAL_V1),  # "\n<s>": BOS after leading whitespace
    Spec("llamacpp-mistral-nemo-instruct-2407.jinja", **MISTRAL_V3),  # system on the last user turn only
    Spec("llamacpp-mistral-small-3.1-24b-instruct-2503.jinja", **MISTRAL_V3),  # v7: [SYSTEM_PROMPT], default system
    Spec("trl-deepseekv3.jinja", **DEEPSEEK),
    Spec("llamacpp-deepseek-r1-distill-qwen-32b.jinja", **DEEPSEEK),  # generation prompt opens <think>
    Spec("trl-cohere.jinja", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", eot="<|END_OF_TURN_TOKEN|>"),
    Spec("community-granite-3.0-instruct.jinja", bos="<|end_of_text|>", eos="<|end_of_text|>", eot="<|end_of_text|>"),
    Spec("community-zephyr.jinja", bos="<s>", eos="</s>", eot="</s>", plain=("<|system|>", "<|user|>", "<|assistant|>")),
    Spec("hub-smollm2-1.7b-instruct.jinja", bos="<|im_start|>", eos="<|im_end|>", eot="<|im_end|>"),
    Spec("hub-olmo-2-1124-instruct.jinja", bos="<|endoftext|>", eos="<|endoftext|>", eot="<|endoftext|>",
         plain=("<|system|>", "<|user|>", "<|assistant|>")),
)

SYSTEM = "Answer briefly."
REPLIES = ["The capital of Vardon is Quellis.", "Eskaria's capital is Arvenport."]
CASES = {
    "single": [{"role": "user", "content": "What is the capital of Vardon?"},
               {"role": "assistant", "content": REPLIES[0]}],
    "multi": [{"role": "user", "content": "What is the capital of Vardon?"},
              {"role": "assistant", "content": REPLIES[0]},
              {"role": "user", "content": "And of Eskaria?"},
              {"role": "assistant", "content": REPLIES[1]}],
}
CORPUS = ["What is the capital of Vardon?", *REPLIES, "And of Eskaria?", SYSTEM, "user", "assistant", "system",
          "model", "You are a helpful assistant."]


def make_tokenizer(spec: Spec, adds_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = spec.special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token="<pad>",
        additional_special_tokens=[t for t in specials if t not in (spec.bos, spec.eos)],
        chat_template=spec.template, clean_up_tokenization_spaces=False)
