variable "run_id" {
  type = string
}

job "report" {
  type = "batch"

  group "report" {
    task "report" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", "echo \"run $RUN_ID finished its steps\""]
      }

      env {
        RUN_ID = var.run_id
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
