// sps-worker: the worker program with the built-in models and datasets.
#include "sps/worker.h"

int main(int argc, char** argv) { return sps::worker_main(argc, argv, sps::builtin_registry()); }
