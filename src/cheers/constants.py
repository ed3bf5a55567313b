"""Token ids and placeholders of the released Cheers checkpoint (spec §C.1).

Tiny presets use their own small tokenizer, so the model never hard-codes these: they are the defaults of
`cheers.config.TokenIds`, and a model directory's tokenizer decides the ids actually used.
"""

PAD_ID = 151643  # <|endoftext|>
CHAT_START_ID = 151644  # <|im_start|>
CHAT_END_ID = 151645  # <|im_end|>: the only stop token of the sampler
IMAGE_ID = 151665  # <image>: an image to read
IMAGE_GEN_ID = 151666  # <image_gen>: an image to generate (training only)
IMG_START_ID = 151667  # <im_start>: image begins; generation switches to the image branch after it
IMG_END_ID = 151668  # <im_end>
NO_MEAN_ID = 151669  # <no_mean>: filler of unconditional (CFG) prompts
NEWLINE_ID = 198

# In id streams, images are single negative placeholders, expanded to N_img tokens inside the model.
IMAGE_PLACEHOLDER = -200  # read (t = 1)
IMAGE_GEN_PLACEHOLDER = -300  # generated (t ~ U(0, 1) in training)
IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The training data format's instruction after a text-to-image prompt (the reference's generation template).
GENERATION_INSTRUCTION = "Based on the above description, generate an image."
