"""A tiny BERT text encoder built locally (random init) and saved like a real Hugging Face model.

The WordPiece vocabulary is trained with ``tokenizers`` on a few seeded report-style sentences; the
model is a 2-layer ``BertModel``. Both are written with ``save_pretrained`` so that tests and the
benchmark load them through the same offline path (`insitu.text.load_text_encoder`) as ClinicalBERT
or CXR-BERT would be. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

# report-style sentences the vocabulary is trained on (synthetic, written for tests)
CORPUS = [
    "FINDINGS: Heart size is normal. The lungs are clear. IMPRESSION: No acute cardiopulmonary abnormality.",
    "No focal consolidation, pleural effusion or pneumothorax.",
    "Right lower lobe opacity consistent with pneumonia.",
    "Patchy airspace disease in the left lung, compatible with infection.",
    "Bilateral perihilar infiltrates suggest viral pneumonia.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Mass in the upper lobe. Nodule. Calcified granuloma. Fracture of the rib.",
    "Benign malignant normal lesion tumour polyp water forest urban field cloud road river.",
]


def build_tiny_bert(out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny BERT (config, safetensors weights, WordPiece tokenizer) to ``out_dir``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    fast.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(out_dir)
    return out_dir
