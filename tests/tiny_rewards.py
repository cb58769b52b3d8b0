"""Test helpers shared by the reward tests: imscore's real classes built at small sizes."""
import functools

from mfm_fast.reward_models import blip_tokenizer_loader


def shrink_imagereward(m, lib, bert_dir):
    """Make imscore's ImageReward (module `lib`, monkeypatch `m`) build its real classes small: BLIP's ViT one block
    wide 64, its BERT one layer (the MLP head fixes the text width at 768), and the local BERT tokenizer in
    `bert_dir` in place of the hub's."""
    vit, blip, bert_config = lib.VisionTransformer, lib.BLIP, lib.BertConfig

    class SmallBertConfig:
        @staticmethod
        def from_dict(config):
            return bert_config.from_dict({**config, "num_hidden_layers": 1, "intermediate_size": 64,
                                          "vocab_size": 32})

    m.setattr(lib, "VisionTransformer", lambda **kw: vit(**{**kw, "depth": 1, "num_heads": 4}))
    m.setattr(lib, "BLIP", functools.partial(blip, vision_width=64))
    m.setattr(lib, "BertConfig", SmallBertConfig)
    m.setattr(lib, "BertTokenizer", blip_tokenizer_loader(bert_dir))
    return lib
