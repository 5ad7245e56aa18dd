variable "build_id" {
  type    = string
  default = "local"
}

job "build" {
  type = "batch"

  group "build" {
    task "build" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", "echo \"building $BUILD_ID\"; echo compiled > build.txt; cat build.txt"]
      }

      env {
        BUILD_ID = var.build_id
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
