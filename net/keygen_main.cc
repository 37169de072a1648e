// sps-keygen: makes CURVE key pairs for security.curve.
#include <iostream>

#include <CLI/CLI.hpp>

#include "net/curve.h"

int main(int argc, char** argv) {
  CLI::App app{"sps-keygen: makes a CURVE key pair for an sps job (security.curve).\n"
               "Writes NAME.key (public + secret key, mode 0600: point security.key_file at it) and\n"
               "NAME.pub (the public key alone: for security.server_key_file and\n"
               "security.allowed_keys_file on other hosts)."};
  std::vector<std::string> names;
  bool force = false;
  app.add_option("NAME", names, "Key pair(s) to make, e.g. keys/job (writes keys/job.key and keys/job.pub)")
      ->required();
  app.add_flag("--force", force, "Replace existing files");
  CLI11_PARSE(app, argc, argv);
  for (const auto& name : names) {
    auto keys = sps::net::generate_curve_keys();
    if (!keys.ok()) {
      std::cerr << "sps-keygen: " << keys.status().message() << "\n";
      return 1;
    }
    if (const auto s = sps::net::write_key_files(name, *keys, force); !s.ok()) {
      std::cerr << "sps-keygen: " << s.message() << "\n";
      return 1;
    }
    std::cout << name << ".key  " << name << ".pub  public key " << keys->public_key << "\n";
  }
  return 0;
}
