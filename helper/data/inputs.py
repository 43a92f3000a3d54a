"""Everything a defense run reads, checked before its folder is made: the teacher and its trigger (``load_inputs``),
the teacher's dataset and the defense images (``load_data``, also the scan's), and the re-tuning attack's labelled
set (``retune_set``)."""
import torch

from helper.data import images as D
from helper.data.images import Split
from helper.data.teacher_dir import read_teacher
from helper.data.trigger import POISON_SEED_OFFSET, poisoned_labels
from helper.run.errors import UserError


def load_inputs(args):
    """Everything a run reads, checked before its folder is made: teacher, trigger (``--trigger_dir``'s when given),
    test set, defense images, and with ``--retune`` the re-tuning set (``retune_set``), else None."""
    teacher, pattern, mask = read_teacher(args.read_dir, args.width, args.thresh_mask, args.trigger_dir)
    task_train, task_test, defense = load_data(args)
    if not 0 <= args.target_label < teacher.num_classes:
        raise UserError(f"--target_label {args.target_label} is not a class of the {teacher.num_classes}-class teacher")
    if len(task_test) and int(task_test.y.max()) >= teacher.num_classes:
        raise UserError(f"{args.dataset} has labels up to {int(task_test.y.max())} but the teacher has "
                        f"{teacher.num_classes} classes: --dataset must be what the teacher was trained on")
    retune_data = (retune_set(task_train, args.retune_images, args.retune_poison, args.target_label, args.seed)
                   if args.retune else None)
    return teacher, pattern, mask, task_test, defense, retune_data


def load_data(args):
    """(the teacher's train split, its test split, the defense images) as the Data flags name them."""
    kw = dict(data_root=args.data_root, download=not args.no_download, synthetic_seed=args.synthetic_seed,
              synthetic_train=args.synthetic_train, synthetic_test=args.synthetic_test)
    task_train, task_test = D.load_splits(args.dataset, role="task", **kw)
    if not len(task_test):
        raise UserError(f"--dataset {args.dataset} has no test images: Acc and ASR would be measured on nothing")
    if args.finetune_in_out == "in":
        defense_train, defense_test = task_train, task_test
    else:
        defense_train, defense_test = D.load_splits(args.finetunedata, role="ood", flag="--finetunedata", **kw)
    pool = D.defense_pool(defense_train, defense_test, args.finetune_extend)
    return task_train, task_test, D.seeded_subset(pool, args.subset_rate, args.seed, args.defense_size)


def retune_set(split, n_images, n_poison, target, seed):
    """``(Split of n_images labelled images, a bool flag per image: stamp the trigger)``: the first ``n_images`` of a
    permutation drawn from ``torch.Generator().manual_seed(seed + POISON_SEED_OFFSET)``; the first ``n_poison`` of them whose label is not
    ``target`` are flagged and relabelled to ``target``. Too few images is a UserError naming the flag."""
    if n_images > len(split):
        raise UserError(f"--retune_images {n_images}: the training split of --dataset has {len(split)} images")
    # not ``seed`` itself, which draws the defense subset (the same images with --finetune_in_out in)
    generator = torch.Generator().manual_seed(seed + POISON_SEED_OFFSET)
    subset = split.subset(torch.randperm(len(split), generator=generator)[:n_images])
    candidates = (subset.y != int(target)).nonzero().flatten()
    if len(candidates) < n_poison:
        raise UserError(f"--retune_poison {n_poison}: only {len(candidates)} of the {n_images} re-tuning images are "
                        f"not of the target class")
    labels, stamp = poisoned_labels(subset.y, candidates[:n_poison], target)
    return Split(subset.x, labels), stamp
