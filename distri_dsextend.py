"""ASD on 60,000 defense images: CIFAR-100 train + test. The same run as distri.py, with two defaults changed."""
from distri import main

if __name__ == "__main__":
    main(finetune_extend=True, subset_rate=1.0)
