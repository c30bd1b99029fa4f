"""What runs inside or beside the serving pods (the Gradio chat page). Never imported by the operator."""
