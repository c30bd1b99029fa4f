"""What runs beside vLLM in the serving pods: the adapter fetcher (`kubetune fetcher`) and the Gradio chat
page (`kubetune ui`). Never imported by the operator."""
