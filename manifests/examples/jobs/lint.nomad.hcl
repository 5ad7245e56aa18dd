# Fails (exit 1) when `fail` is "true": the DAG example's failing branch.
variable "fail" {
  type    = string
  default = "false"
}

job "lint" {
  type = "batch"

  group "lint" {
    task "lint" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", "echo linting; if [ \"$FAIL\" = true ]; then echo 'lint failed' >&2; exit 1; fi"]
      }

      env {
        FAIL = var.fail
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
