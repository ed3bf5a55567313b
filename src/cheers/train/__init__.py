"""Training of Cheers: the trainer (`cheers.train.engine`: one stage trainer per stage kind over the shared run
loop of `cheers.train.run`) and its data pipeline (`cheers.train.data`, over `records`, `sources` and `feed`)."""
