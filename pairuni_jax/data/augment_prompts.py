"""The LLM prompts of the aligned-pair augmentation, in one place (see augment.py).

Each template is formatted with str.format; the LLM sees only text (no image), so a generation
prompt is written from the question and its correct option, and a question from the prompt.
"""

WRITE_GENERATION_PROMPT = """\
You write prompts for a text-to-image model.
Below is a multiple-choice question about an image, with its correct answer.
Write one text-to-image prompt (one or two sentences, at most 60 words) describing an image in
which the correct answer is clearly visible, so that anyone reading only the prompt would answer
the question correctly. Describe the scene concretely; do not mention the question or the options.

Question:
{question}

Correct answer: {answer}. {answer_text}

Reply with the prompt only."""

WRITE_QUESTION = """\
You write multiple-choice questions about images.
Below is the text-to-image prompt an image was generated from. Write one multiple-choice question
about a visual fact stated in the prompt (an object, colour, count, position or attribute), with
2 to 4 short options of which exactly one is correct according to the prompt.

Prompt: {prompt}

Reply with JSON only, in this form:
{{"question": "What colour is the car?", "options": ["red", "blue", "green"], "answer": "A"}}
where "answer" is the letter (A, B, C or D) of the correct option."""

VERIFY = """\
Read the image description and answer the multiple-choice question using only the description.

Description: {prompt}

Question:
{question}

Reply with the letter of the correct option only, or "none" if the description does not say."""
