"""A randomly initialised Hugging Face Marian, trained on the offline Bible corpus with polycats'
temperature sampler and a balancer (CATS by default), then scored per language.

The data is the demo preset's (``polycats prepare``, cached), the model is ``MarianMTModel`` built
from a ``MarianConfig`` of the preset's sizes: nothing is downloaded. At tiny size (seconds)::

    python examples/hf_marian.py --steps 4 --set "data.languages={de: 200, sw: 40}" \\
        --set data.valid_per_lang=10 --set data.test_per_lang=10 --set data.vocab_size=500 \\
        --set data.tokenizer_sentences=2000

α and λ go to the Trainer's logs (TensorBoard under ``--out``: ``tensorboard --logdir OUT``).
"""

from __future__ import annotations

import argparse

import datasets
import torch
from transformers import MarianConfig, MarianMTModel, Seq2SeqTrainingArguments

from polycats.config import load_config, preset_path
from polycats.data.prepare import BOS, EOS, EVAL_TOKEN_LIMIT, PAD, prepare
from polycats.data.sampling import SamplingSchedule
from polycats.integrations.hf import BalancedSeq2SeqTrainer, TokenIdCollator, dataset_from_prepared, translation_metrics
from polycats.run.build import build_balancer


def marian(model, vocab_size: int) -> MarianMTModel:
    """A Marian of the config's ``model`` sizes, randomly initialised."""
    return MarianMTModel(MarianConfig(
        vocab_size=vocab_size, d_model=model.d_model, encoder_layers=model.encoder_layers,
        decoder_layers=model.decoder_layers, encoder_attention_heads=model.heads, decoder_attention_heads=model.heads,
        encoder_ffn_dim=model.ffn_dim, decoder_ffn_dim=model.ffn_dim, activation_function="relu",
        dropout=model.dropout, attention_dropout=model.attention_dropout, max_position_embeddings=EVAL_TOKEN_LIMIT,  # validation sentences are never cut shorter
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=BOS, forced_eos_token_id=None,
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(preset_path("demo")))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, as polycats train --set (repeatable)")
    parser.add_argument("--method", default="cats", help="balancer.name: scalar, cats, pcgrad, upgrad, ...")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per step")
    parser.add_argument("--eval-sentences", type=int, default=50, help="validation sentences per language")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="runs/hf_marian")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()

    config = load_config(args.config, [f"balancer.name={args.method}", *args.set])
    data = prepare(config.data)
    train = dataset_from_prepared(data, "train")
    valid = dataset_from_prepared(data, "valid", per_task=args.eval_sentences)
    schedule = SamplingSchedule.from_config(config.sampling, data.task_table)
    torch.manual_seed(config.train.seed)
    model = marian(config.model, data.vocab_size)

    t = config.train
    trainer = BalancedSeq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, learning_rate=t.lr, warmup_steps=min(t.warmup_updates, args.steps),
            label_smoothing_factor=t.label_smoothing, max_grad_norm=t.clip_norm or 0.0, seed=t.seed,
            logging_steps=max(1, min(t.log_every, args.steps // 2)), save_strategy="no", report_to=["tensorboard"],
            predict_with_generate=True, generation_max_length=config.data.max_len + 2, generation_num_beams=1,
            disable_tqdm=True, use_cpu=config.train.device == "cpu", dataloader_pin_memory=torch.cuda.is_available(),
        ),
        train_dataset=train,
        eval_dataset=valid,
        balancer=build_balancer(config, data.tasks, schedule.probabilities),
        schedule=schedule,
        data_collator=TokenIdCollator(PAD, BOS),
        compute_metrics=translation_metrics(valid["task"], data.decode, data.meta["groups"]),
    )
    trainer.train()
    balancer_logs = [log for log in trainer.state.log_history if any(key.startswith("alpha/") for key in log)]
    if balancer_logs:
        last = balancer_logs[-1]
        print("alpha after step", last["step"], {key: round(value, 3) for key, value in last.items() if key.startswith("alpha/")})
    metrics = trainer.evaluate()
    print(f"{'valid':<8} {'BLEU':>6} {'chrF':>6}")
    for name in [*data.tasks, "LoRes", "MidRes", "HiRes", "All"]:
        if f"eval_bleu/{name}" in metrics:
            print(f"{name:<8} {metrics[f'eval_bleu/{name}']:6.1f} {metrics[f'eval_chrf/{name}']:6.1f}")


if __name__ == "__main__":
    main()
