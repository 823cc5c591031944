"""The export's sentencepiece tokenizer for Hugging Face transformers (`AutoTokenizer`).

Self-contained: imports sentencepiece and transformers only. Text is encoded exactly as
`pretrain.data.Tokenizer.encode` does (the sentencepiece model as trained, no start token added),
except that special-token strings written in the text ("</s>") become their ids, the way
transformers tokenizers treat them: the fact-probe tasks start every prompt with the
document separator "</s>" as training did. Decoding is sentencepiece's own, so the space a
continuation's first piece carries survives `decode(prompt_ids + continuation_ids)`.
"""

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class MemlayersTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        if not vocab_file or not os.path.isfile(vocab_file):
            raise ValueError(
                f"tokenizer file {vocab_file} does not exist: an export ships its tokenizer.model "
                "(re-export with tools/export.py)"
            )
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(vocab_file)
        piece = self.sp.id_to_piece
        # Training starts every document after the EOS separator and never sees sentencepiece's
        # BOS piece: the start token (lm_eval's loglikelihood prefix) is EOS, as config.json's
        # bos_token_id (transformers' generate() with no prompt) is.
        for name, index in (
            ("eos_token", self.sp.eos_id()),
            ("bos_token", self.sp.eos_id()),
            ("unk_token", self.sp.unk_id()),
        ):
            if index >= 0:
                kwargs.setdefault(name, piece(index))
        # padding only ever sits under a zero attention mask; EOS when the model has no pad piece
        kwargs.setdefault("pad_token", piece(self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.eos_id()))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def get_vocab(self):
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens):
        return self.sp.decode_pieces(list(tokens))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """sentencepiece's decoding of each run of ordinary ids; special ids as their text ("</s>")
        unless skipped, as transformers tokenizers do (lm-eval stops generation on that text)."""
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        special = set(self.all_special_ids)
        parts, run = [], []
        for i in ids:
            if i not in special:
                run.append(i)
                continue
            parts.append(self.sp.decode(run))
            run = []
            if not skip_special_tokens:
                parts.append(self.sp.id_to_piece(i))
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return list(token_ids_0) + list(token_ids_1 or [])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
