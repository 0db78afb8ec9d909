from rlad_megatron.reproduce.driver import main

main()
