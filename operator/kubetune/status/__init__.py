"""Status from what the operator observes (pure functions): the condition convention (`conditions`), the state
and conditions of a FineTuneJob (`finetunejob`) and of a ModelServer (`modelserver`), the admission's check of
a referenced FineTuneJob (`admission`), and what keeps a pod from running (`pods`)."""
