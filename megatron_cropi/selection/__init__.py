"""Selection: influence scores against target sets, and the policies that pick each stage's prompts."""
