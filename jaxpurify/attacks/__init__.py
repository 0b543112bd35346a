"""Encoder-level backdoor attacks: BadEncoder and DRUPE fine-tune a clean encoder (`encoder_finetune`),
CTRL poisons the pre-training set (`ctrl`); `references` picks the target-class reference images."""
