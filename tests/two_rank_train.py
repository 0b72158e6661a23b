"""Run by tests/test_finetune.py with two CPU ranks (under torch.distributed.run or accelerate launch)."""

import hashlib
import sys
from pathlib import Path

from accelerate import Accelerator

from edgesafe import load_pipeline
from edgesafe.finetune.trainer import Trainer
from edgesafe.models.inputs import unet_example_inputs
from edgesafe.prune import prune_width
from edgesafe.recipe import load_recipe

pipeline, recipe_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
accelerator = Accelerator(cpu=True)
teacher = load_pipeline(pipeline)
pruned = prune_width(teacher.unet, 0.25, unet_example_inputs(teacher.unet, batch=1, text_length=16))
recipe = load_recipe(recipe_path, overrides={"finetune.steps": 2, "finetune.batch_size": 2})
trainer = Trainer(teacher, pruned.unet, recipe, out, kept_channels=pruned.kept_channels, accelerator=accelerator)
result = trainer.run(resume=False, checkpoint_every=10)
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in result.student.state_dict().values())).hexdigest()
(out / f"rank{accelerator.process_index}-of-{accelerator.num_processes}.txt").write_text(digest)
