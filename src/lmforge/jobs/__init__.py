"""Fine-tuning jobs and files in OpenAI's API shapes, and users' feedback on replies: a SQLite store, file
validation, the job scheduler (a thread of the server) and the worker process that runs finetune/'s recipes."""
