"""llamacord's benchmarks: `llamacord bench` (`bench`), the store (`store`) and the bot's own overhead
(`bot_overhead`), and the random-weight Llama they share with the tests (`random_llama`). Not on the bot's runtime
path: only the `bench` command imports this package, lazily."""
