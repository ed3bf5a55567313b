"""Training of Cheers: the data pipeline (`cheers.train.data`) and the trainer."""
