"""Small models the tasks train: a residual MLP and a GPT, written with plain torch."""
